"""The governed path in the kernel, without a transport: policy, schema, quotas, sandbox and
the audit record every outcome leaves."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from click.testing import CliRunner

from mcp_zero.cli.main import main
from mcp_zero.errors import (
    InvalidParams,
    McpZeroError,
    PluginCrashed,
    PluginFailure,
    PolicyDenied,
    PromptNotFound,
    ResourceNotFound,
    ToolNotFound,
    ToolTimeout,
    Unauthorized,
)
from mcp_zero.kernel.action import Principal, Verb
from mcp_zero.kernel.pipeline import PluginSlot, PluginSlots
from mcp_zero.runtime import Runtime
from plugin_builders import asking_plugin, forging_plugin, gated_plugin, write_plugin

pytestmark = pytest.mark.anyio
ALL = frozenset({"notes", "faulty", "conformance"})
TIMEOUT_S = 20.0
FAULTY_DIR = Path(__file__).parents[1] / "plugins" / "faulty"
CONFORMANCE_DIR = Path(__file__).parents[1] / "plugins" / "conformance"
KIT_DIR = Path(__file__).parents[1] / "sandbox" / "kit"


def records(runtime: Runtime, **match: Any) -> list[dict[str, Any]]:
    out = []
    for entry in runtime.store.read_audit(0, 100_000):
        body = orjson.loads(entry.body)
        if all(body.get(k) == v for k, v in match.items()):
            out.append(body)
    return out


async def call(
    runtime: Runtime, principal: Principal, tool: str, args: dict[str, Any], rid: str, bridge: Any
) -> Any:
    with anyio.fail_after(TIMEOUT_S):
        return await runtime.kernel.call_tool(
            principal, tool, args, bridge, request_id=rid, transport="test"
        )


async def new_agent(runtime: Runtime, name: str, *plugins: str) -> Principal:
    """A new agent ``name`` with ``plugins`` attached: a call that waited for its plugin looks
    its agent up again (its status, its plugins), as a new call would."""
    await runtime.agents.spawn(name, list(plugins))
    return runtime.agents.principal(name)


async def test_an_allowed_call_returns_the_result_and_is_audited(
    started: Runtime, bridge: Any
) -> None:
    agent = Principal("alice", frozenset({"faulty"}))
    args = {"text": "hello"}
    result = await call(started, agent, "faulty_echo", args, "k1", bridge)
    assert result["content"] == [{"type": "text", "text": "hello"}]
    [record] = records(started, request_id="k1")
    assert record["outcome"] == "allowed"
    assert record["agent"] == "alice"
    assert record["plugin"] == "faulty"
    assert record["verb"] == "call_tool"
    assert record["transport"] == "test"
    assert record["policies"] == ["attached-plugins-only"]
    assert record["duration_ms"] >= 0
    digest = hashlib.sha256(orjson.dumps(args, option=orjson.OPT_SORT_KEYS)).hexdigest()
    assert record["arguments_sha256"] == digest
    assert "hello" not in orjson.dumps(record).decode()


async def test_a_call_outside_the_attached_plugins_is_denied(started: Runtime, bridge: Any) -> None:
    agent = Principal("bob", frozenset({"notes"}))
    with pytest.raises(PolicyDenied) as caught:
        await call(started, agent, "faulty_echo", {"text": "x"}, "k2", bridge)
    assert caught.value.data is not None
    assert caught.value.data["policies"] == ["attached-plugins-only"]
    [record] = records(started, request_id="k2")
    assert record["outcome"] == "denied"
    assert record["code"] == "policy_denied"
    assert record["policies"] == ["attached-plugins-only"]


async def test_the_admin_may_call_any_tool(started: Runtime, bridge: Any) -> None:
    admin = Principal("admin", frozenset(), admin=True)
    result = await call(started, admin, "faulty_echo", {"text": "root"}, "k3", bridge)
    assert result["content"][0]["text"] == "root"
    assert records(started, request_id="k3")[0]["policies"] == ["admin-all"]


async def test_schema_errors_name_the_path_before_the_plugin_runs(
    started: Runtime, bridge: Any
) -> None:
    agent = Principal("carol", ALL)
    with pytest.raises(InvalidParams) as caught:
        await call(started, agent, "faulty_progress", {"steps": 0}, "k4", bridge)
    assert caught.value.data == {"path": "/steps", "schemaPath": "/properties/steps/minimum"}
    assert bridge.events == []  # the tool never ran
    assert records(started, request_id="k4")[0]["code"] == "invalid_params"


async def test_a_schema_error_quotes_a_huge_value_only_in_part(
    started: Runtime, bridge: Any
) -> None:
    agent = Principal("carol", ALL)
    with pytest.raises(InvalidParams) as caught:
        await call(started, agent, "faulty_echo", {"text": ["x" * 500_000]}, "k4b", bridge)
    message = caught.value.message
    assert message.startswith('invalid arguments at /text: ["xxx')
    assert message.endswith('is not of type "string"')
    assert "characters omitted" in message
    assert len(message) < 300


async def test_schema_is_checked_only_after_policy(started: Runtime, bridge: Any) -> None:
    # a denied agent learns nothing about the tool's schema
    with pytest.raises(PolicyDenied):
        await call(started, Principal("dave"), "faulty_progress", {"steps": "x"}, "k5", bridge)


async def test_an_unknown_tool_is_tool_not_found_and_audited(started: Runtime, bridge: Any) -> None:
    with pytest.raises(ToolNotFound):
        await call(started, Principal("erin", ALL), "nope", {}, "k6", bridge)
    [record] = records(started, request_id="k6")
    assert record["outcome"] == "error"
    assert record["code"] == "tool_not_found"
    assert record["plugin"] is None


async def test_a_huge_unknown_tool_name_is_neither_echoed_nor_audited_whole(
    started: Runtime, bridge: Any
) -> None:
    # The admin's execute answered a 500,000-character name with a 1 MB error and audited it
    # whole: /mcp refuses a name past 128 characters before the kernel, which took any
    # (found by review)
    with pytest.raises(InvalidParams) as refused:
        await call(started, Principal("erin", ALL), "z" * 500_000, {}, "k6b", bridge)
    assert refused.value.message == "the tool name has 500000 characters; at most 128 are allowed"
    assert refused.value.data == {"limit": 128}
    [record] = records(started, request_id="k6b")
    assert (record["resource"], record["code"]) == ("", "invalid_params")
    with pytest.raises(ToolNotFound) as unknown:  # one a tool could have: shown in part
        await call(started, Principal("erin", ALL), "y" * 128, {}, "k6c", bridge)
    assert unknown.value.message.startswith(f"unknown tool {'y' * 64!r}… (128 characters)")


async def test_progress_and_logs_go_to_the_bridge(started: Runtime, bridge: Any) -> None:
    agent = Principal("frank", ALL)
    await call(started, agent, "faulty_progress", {"steps": 3}, "k7", bridge)
    assert bridge.events == [("progress", 1), ("progress", 2), ("progress", 3)]
    bridge.events.clear()
    await call(started, agent, "faulty_log_levels", {}, "k8", bridge)
    assert bridge.events == [
        ("log", "debug"),
        ("log", "info"),
        ("log", "warning"),
        ("log", "error"),
    ]


async def test_sampling_goes_through_the_bridge(started: Runtime, bridge: Any) -> None:
    agent = Principal("gina", ALL)
    result = await call(started, agent, "test_sampling", {"prompt": "p"}, "k9", bridge)
    assert result["content"][0]["text"] == "LLM response: sampled"
    # The plugin's request to the client is an action of its own: decided and audited.
    [relayed] = records(started, request_id="k9", verb="client_request")
    assert relayed["resource"] == "sampling/createMessage"
    assert relayed["plugin"] == "conformance"
    assert relayed["outcome"] == "allowed"
    assert relayed["policies"] == ["attached-plugins-client-requests"]


async def test_a_policy_can_forbid_a_plugin_to_sample_the_client(
    started: Runtime, bridge: Any
) -> None:
    (started.settings.policy_dir / "no-sampling.cedar").write_text(
        '@id("no-sampling")\n'
        '@reason("plugins may not ask this client for completions")\n'
        'forbid (principal, action == Action::"client_request",\n'
        '        resource == ClientRequest::"sampling/createMessage");\n'
    )
    started.policy.reload()
    agent = Principal("gina", ALL)
    result = await call(started, agent, "test_sampling", {"prompt": "p"}, "k9b", bridge)
    assert result.get("isError") is True
    assert "no-sampling" in result["content"][0]["text"]
    [relayed] = records(started, request_id="k9b", verb="client_request")
    assert relayed["outcome"] == "denied"
    assert relayed["policies"] == ["no-sampling"]
    assert relayed["reasons"] == ["plugins may not ask this client for completions"]
    [call_record] = records(started, request_id="k9b", verb="call_tool")
    assert call_record["tool_error"] is True


async def test_crash_and_timeout_are_audited_with_their_outcomes(
    started: Runtime, bridge: Any
) -> None:
    # (a real agent: the call after the crash waits for a worker, and looks its agent up again)
    agent = await new_agent(started, "hank", *ALL)
    with pytest.raises(PluginCrashed):
        await call(started, agent, "faulty_crash", {}, "k10", bridge)
    with pytest.raises(ToolTimeout):
        await call(started, agent, "faulty_hang", {}, "k11", bridge)
    assert records(started, request_id="k10")[0]["outcome"] == "error"
    assert records(started, request_id="k10")[0]["code"] == "plugin_crashed"
    assert records(started, request_id="k11")[0]["outcome"] == "timeout"
    assert records(started, request_id="k11")[0]["code"] == "tool_timeout"
    assert (await call(started, agent, "faulty_echo", {"text": "ok"}, "k12", bridge))["content"]
    # the hung handler counts for its agent until its worker is killed, after the grace
    with anyio.fail_after(TIMEOUT_S):
        while started.quotas.inflight("hank"):
            await anyio.sleep(0.02)


async def test_each_replaced_worker_counts_one_plugin_restart(
    started: Runtime, bridge: Any
) -> None:
    """A crash during a call, a kill past a call's timeout and the death of an idle worker
    are three restarts (calls that fail are not what the counter counts)."""

    def restarts() -> int:
        body, _ = started.metrics.render()
        line = 'mcp0_plugin_restarts_total{plugin="faulty"} '
        found = [ln for ln in body.decode().splitlines() if ln.startswith(line)]
        return int(float(found[0][len(line) :])) if found else 0

    async def running_pid() -> int:
        with anyio.fail_after(TIMEOUT_S):
            while not (pids := started.plugins.runtimes["faulty"].pids):
                await asyncio.sleep(0.02)
        return int(pids[0])

    agent = await new_agent(started, "rita", *ALL)  # (calls wait for restarted workers)
    assert restarts() == 0
    with pytest.raises(PluginCrashed):
        await call(started, agent, "faulty_crash", {}, "r1", bridge)
    assert restarts() == 1
    with pytest.raises(ToolTimeout):
        await call(started, agent, "faulty_hang", {}, "r2", bridge)
    with anyio.fail_after(TIMEOUT_S):
        while restarts() < 2:  # (killed once its grace is over)
            await asyncio.sleep(0.02)
    os.kill(await running_pid(), signal.SIGKILL)
    with anyio.fail_after(TIMEOUT_S):
        while restarts() < 3:
            await asyncio.sleep(0.02)
    assert (await call(started, agent, "faulty_echo", {"text": "ok"}, "r3", bridge))["content"]
    assert restarts() == 3


async def test_a_cancelled_call_is_still_audited(started: Runtime, bridge: Any) -> None:
    agent = Principal("ivy", ALL)
    task = asyncio.create_task(call(started, agent, "faulty_nap", {"seconds": 5}, "k13", bridge))
    with anyio.fail_after(TIMEOUT_S):
        while started.quotas.inflight("ivy") == 0:
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [record] = records(started, request_id="k13")
    assert record["code"] == "cancelled"
    assert started.quotas.inflight("ivy") == 0


async def test_a_call_cancelled_once_its_plugin_answered_is_recorded_as_done(
    make_runtime: Any, bridge: Any
) -> None:
    # Its answer waited unread (held while a long window gathers) when the client's cancel
    # came: the call was recorded "cancelled", though the plugin had done it (found by
    # review). The caller gets the answer, and the record says allowed.
    runtime: Runtime = make_runtime(audit_window_ms=3000)
    runtime.plugins.install(FAULTY_DIR)
    await runtime.start()
    agent = Principal("ivy", frozenset({"faulty"}))
    task = asyncio.create_task(call(runtime, agent, "faulty_echo", {"text": "done"}, "h", bridge))
    await asyncio.sleep(0.5)  # answered long ago, not read: its window is open for 3 s
    assert not task.done()
    task.cancel()
    with anyio.fail_after(TIMEOUT_S):
        result = await task
    assert result["content"] == [{"type": "text", "text": "done"}]
    assert task.cancelling() == 0
    [record] = records(runtime, request_id="h")
    assert record["outcome"] == "allowed"


async def test_a_call_cancelled_while_its_record_is_written_is_answered_as_recorded(
    started: Runtime, bridge: Any
) -> None:
    # The caller was told "cancelled" while the record of the call, which had run, was
    # committed as allowed (found by review)
    other = sqlite3.connect(started.settings.db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # (as a CLI command writing beside the server)
        agent = Principal("ivy", ALL)
        task = asyncio.create_task(call(started, agent, "faulty_echo", {"text": "x"}, "c", bridge))
        with anyio.fail_after(TIMEOUT_S):
            while started.audit.stats.busy_retries == 0:  # it ran; its record waits
                assert not task.done(), task.result()
                await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()  # (a second cancel too)
        await asyncio.sleep(0)
        assert not task.done()  # no answer before its record is durable
        other.execute("ROLLBACK")
    finally:
        other.close()
    with anyio.fail_after(TIMEOUT_S):
        result = await task
    assert result["content"] == [{"type": "text", "text": "x"}]
    assert task.cancelling() == 0  # the cancels came too late, and were withdrawn
    [record] = records(started, request_id="c")
    assert record["outcome"] == "allowed"


async def test_a_subscription_cancelled_while_its_records_are_written_is_answered_as_recorded(
    started: Runtime,
) -> None:
    # (as a call: answered "cancelled" while its records were committed as allowed, and the
    # subscription not made: found by review)
    other = sqlite3.connect(started.settings.db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        deciding = asyncio.ensure_future(
            started.kernel.subscribe(
                Principal("ivy", ALL),
                ["faulty://counter", "notes://nowhere"],
                method="resources/subscribe",
                request_id="s",
                transport="test",
            )
        )
        with anyio.fail_after(TIMEOUT_S):
            while started.audit.stats.busy_retries == 0:  # decided; its records wait
                assert not deciding.done(), deciding.result()
                await asyncio.sleep(0.01)
        deciding.cancel()
        await asyncio.sleep(0)
        assert not deciding.done()  # no answer before its records are durable
        other.execute("ROLLBACK")
    finally:
        other.close()
    with anyio.fail_after(TIMEOUT_S):
        allowed, unknown = await deciding
    assert allowed is None
    assert isinstance(unknown, ResourceNotFound)
    outcomes = [(r["resource"], r["outcome"]) for r in records(started, request_id="s")]
    assert outcomes == [("faulty://counter", "allowed"), ("notes://nowhere", "error")]


async def test_list_tools_shows_only_attached_plugins_and_follows_policy_reloads(
    started: Runtime,
) -> None:
    kernel = started.kernel
    notes_only = Principal("jo", frozenset({"notes"}))
    assert {t["name"] for t in kernel.listing(notes_only, "tools")[0]} == {
        "notes_add",
        "notes_search",
        "notes_list",
        "notes_delete",
    }
    assert kernel.listing(Principal("nobody"), "tools")[0] == []
    hide = started.settings.policy_dir / "hide.cedar"
    hide.write_text(
        '@id("hide-notes")\n@reason("notes are hidden")\n'
        'forbid (principal, action == Action::"list_tools", resource == Plugin::"notes");\n'
    )
    started.policy.reload()
    assert kernel.listing(notes_only, "tools")[0] == []
    hide.unlink()
    started.policy.reload()
    assert len(kernel.listing(notes_only, "tools")[0]) == 4


async def test_a_policy_naming_one_agent_hides_its_list_whoever_listed_first(
    started: Runtime,
) -> None:
    kernel = started.kernel
    alice = Principal("alice", frozenset({"notes"}))
    bob = Principal("bob", frozenset({"notes"}))  # the same plugins as alice
    (started.settings.policy_dir / "bob.cedar").write_text(
        '@id("no-lists-for-bob")\n'
        'forbid (principal == Agent::"bob", action == Action::"list_tools", resource);\n'
    )
    started.policy.reload()
    assert len(kernel.listing(alice, "tools")[0]) == 4
    assert kernel.listing(bob, "tools")[0] == []  # not alice's list, cached for the same plugins


async def test_resources_prompts_and_completions_are_governed(
    started: Runtime, bridge: Any
) -> None:
    kernel = started.kernel
    agent = Principal("kim", frozenset({"conformance"}))
    outsider = Principal("lee", frozenset({"notes"}))
    read = await kernel.read_resource(
        agent, "test://static-text", bridge, request_id="r1", transport="t"
    )
    assert read["contents"][0]["uri"] == "test://static-text"
    templated = await kernel.read_resource(
        agent, "test://template/7/data", bridge, request_id="r2", transport="t"
    )
    assert templated["contents"]
    with pytest.raises(PolicyDenied):
        await kernel.read_resource(
            outsider, "test://static-text", bridge, request_id="r3", transport="t"
        )
    with pytest.raises(ResourceNotFound):
        await kernel.read_resource(
            agent, "test://nothing-here", bridge, request_id="r4", transport="t"
        )
    prompt = await kernel.get_prompt(
        agent, "test_simple_prompt", {}, bridge, request_id="r5", transport="t"
    )
    assert prompt["messages"]
    with pytest.raises(InvalidParams) as caught:
        await kernel.get_prompt(
            agent,
            "test_prompt_with_arguments",
            {"arg1": "a"},
            bridge,
            request_id="r6",
            transport="t",
        )
    assert caught.value.data == {"path": "/arguments/arg2"}
    with pytest.raises(PromptNotFound):
        await kernel.get_prompt(agent, "no_prompt", {}, bridge, request_id="r7", transport="t")
    with pytest.raises(PolicyDenied):
        await kernel.get_prompt(
            outsider, "test_simple_prompt", {}, bridge, request_id="r8", transport="t"
        )
    outcomes = {
        r["request_id"]: (r["verb"], r["outcome"])
        for r in records(started)
        if r.get("request_id", "").startswith("r")
    }
    assert outcomes == {
        "r1": ("read_resource", "allowed"),
        "r2": ("read_resource", "allowed"),
        "r3": ("read_resource", "denied"),
        "r4": ("read_resource", "error"),
        "r5": ("get_prompt", "allowed"),
        "r6": ("get_prompt", "error"),
        "r7": ("get_prompt", "error"),
        "r8": ("get_prompt", "denied"),
    }


async def test_prompt_and_completion_records_hold_the_digest_of_their_arguments(
    started: Runtime, bridge: Any
) -> None:
    # docs/architecture.md: whatever the outcome; only tools/call records had it
    kernel = started.kernel
    kim = Principal("kim", frozenset({"conformance"}))
    lee = Principal("lee", frozenset({"notes"}))

    def digest(value: Any) -> str:
        return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()

    prompt = "test_prompt_with_arguments"
    given = {"arg1": "alpha", "arg2": "beta"}
    await kernel.get_prompt(kim, prompt, given, bridge, request_id="p1", transport="t")
    with pytest.raises(PolicyDenied):
        await kernel.get_prompt(lee, prompt, given, bridge, request_id="p2", transport="t")
    with pytest.raises(InvalidParams):
        await kernel.get_prompt(kim, prompt, {"arg1": "a"}, bridge, request_id="p3", transport="t")
    await kernel.audit_cancelled(
        kim,
        Verb.GET_PROMPT,
        prompt,
        method="prompts/get",
        request_id="p4",
        transport="t",
        arguments=given,
    )
    ref = {"type": "ref/prompt", "name": prompt}
    argument = {"name": "arg1", "value": "al"}
    context = {"arguments": {"arg2": "beta"}}
    await kernel.complete(kim, ref, argument, None, request_id="c1", transport="t")
    with pytest.raises(PolicyDenied):
        await kernel.complete(lee, ref, argument, context, request_id="c2", transport="t")
    await kernel.audit_cancelled(
        kim,
        Verb.COMPLETE,
        prompt,
        method="completion/complete",
        request_id="c3",
        transport="t",
        arguments={"argument": argument, "context": context},
    )
    sent = {
        "p1": given,
        "p2": given,
        "p3": {"arg1": "a"},
        "p4": given,
        "c1": {"argument": argument, "context": None},
        "c2": {"argument": argument, "context": context},
        "c3": {"argument": argument, "context": context},
    }
    held = {r["request_id"]: r for r in records(started) if r.get("request_id") in sent}
    assert [held[rid]["outcome"] for rid in sent] == [
        *("allowed", "denied", "error", "error"),
        *("allowed", "denied", "error"),
    ]
    assert {rid: held[rid]["arguments_sha256"] for rid in sent} == {
        rid: digest(value) for rid, value in sent.items()
    }


async def test_a_call_queued_for_a_slot_runs_on_the_new_code_after_an_upgrade(
    started: Runtime, bridge: Any
) -> None:
    queuer = await new_agent(started, "queuer", "faulty")
    slots = started.plugins.manifests["faulty"].quotas.max_concurrency
    naps = [
        asyncio.ensure_future(
            call(started, queuer, "faulty_nap", {"seconds": 1.0}, f"n{i}", bridge)
        )
        for i in range(slots)
    ]
    await anyio.sleep(0.2)  # every slot is taken
    queued = asyncio.ensure_future(call(started, queuer, "faulty_echo", {"text": "q"}, "q", bridge))
    await anyio.sleep(0.1)
    assert not queued.done()
    old = started.plugins.runtime("faulty")
    started.plugins.install(FAULTY_DIR, replace=True)
    with anyio.fail_after(30):
        assert await started.plugins.refresh() is True
    assert started.plugins.runtime("faulty") is not old
    for nap in naps:  # the old code finishes what it had
        assert (await nap)["content"][0]["text"] == "napped 1.0"
    # and the queued call, which had the old runtime in hand, went to the new one
    assert (await queued)["content"] == [{"type": "text", "text": "q"}]


async def test_a_forbidden_resource_is_not_reached_under_a_percent_encoded_name(
    started: Runtime, bridge: Any
) -> None:
    kernel = started.kernel
    kim = Principal("kim", frozenset({"conformance"}))
    (started.settings.policy_dir / "no-one.cedar").write_text(
        '@id("not-one")\n'
        'forbid (principal, action == Action::"read_resource", '
        'resource == Resource::"test://template/1/data");\n'
    )
    started.policy.reload()
    for uri in ("test://template/1/data", "test://template/%31/data", "test://t%65mplate/1/data"):
        with pytest.raises(PolicyDenied):
            await kernel.read_resource(kim, uri, bridge, request_id="pct", transport="t")
    # the escape of a reserved character is another name: it reaches what it names
    other = await kernel.read_resource(
        kim, "test://template/2%2f/data", bridge, request_id="pct2", transport="t"
    )
    assert other["contents"][0]["uri"] == "test://template/2%2F/data"
    assert {r["resource"] for r in records(started, request_id="pct")} == {"test://template/1/data"}


async def test_a_forbid_on_a_template_holds_for_every_uri_it_serves(
    started: Runtime, bridge: Any
) -> None:
    kernel = started.kernel
    kim, lee = (
        Principal("kim", frozenset({"conformance"})),
        Principal("lee", frozenset({"conformance"})),
    )
    (started.settings.policy_dir / "no-template.cedar").write_text(
        '@id("no-template-data")\n'
        'forbid (principal == Agent::"kim", action in [Action::"read_resource", '
        'Action::"complete"], resource == Resource::"test://template/{id}/data");\n'
    )
    started.policy.reload()
    assert kernel.listing(kim, "resourceTemplates")[0] == []  # (as it was: the list hides it)
    uri = "test://template/7/data"
    with pytest.raises(PolicyDenied) as denied, anyio.fail_after(TIMEOUT_S):
        await kernel.read_resource(kim, uri, bridge, request_id="tpl1", transport="t")
    assert denied.value.data is not None
    assert denied.value.data["policies"] == ["no-template-data"]
    [record] = records(started, request_id="tpl1")
    assert (record["outcome"], record["resource"]) == ("denied", uri)
    assert record["policies"] == ["no-template-data"]
    with anyio.fail_after(TIMEOUT_S):
        [refused] = await kernel.subscribe(
            kim, [uri], method="resources/subscribe", request_id="tpl2", transport="t"
        )
    assert isinstance(refused, PolicyDenied)
    with pytest.raises(PolicyDenied):
        kernel.check_resource(kim, uri, transport="t")
    for rid, ref in (("tpl3", uri), ("tpl4", "test://template/{id}/data")):
        with pytest.raises(PolicyDenied), anyio.fail_after(TIMEOUT_S):
            await kernel.complete(
                kim,
                {"type": "ref/resource", "uri": ref},
                {"name": "id", "value": "1"},
                None,
                request_id=rid,
                transport="t",
            )
    # the plugin's own resources are no URIs of the template; another agent reads it as ever,
    # allowed by the one permit that allows both
    with anyio.fail_after(TIMEOUT_S):
        await kernel.read_resource(
            kim, "test://static-text", bridge, request_id="tpl5", transport="t"
        )
        read = await kernel.read_resource(lee, uri, bridge, request_id="tpl6", transport="t")
    assert read["contents"][0]["uri"] == uri
    [record] = records(started, request_id="tpl6")
    assert (record["outcome"], record["policies"]) == ("allowed", ["attached-plugins-content"])


async def test_a_permit_on_one_uri_of_a_template_allows_it_without_one_on_the_template(
    started: Runtime, bridge: Any
) -> None:
    # Decided as "both must allow", it needed a permit on the template too: a permit naming
    # one URI stopped working. Only a forbid on the template counts (lead's review).
    max_ = Principal("max")  # no plugin attached: the default policy permits it nothing
    (started.settings.policy_dir / "one-uri.cedar").write_text(
        '@id("max-reads-seven")\n'
        'permit (principal == Agent::"max", action == Action::"read_resource", '
        'resource == Resource::"test://template/7/data");\n'
    )
    started.policy.reload()
    with anyio.fail_after(TIMEOUT_S):
        read = await started.kernel.read_resource(
            max_, "test://template/7/data", bridge, request_id="one1", transport="t"
        )
        with pytest.raises(PolicyDenied):
            await started.kernel.read_resource(
                max_, "test://template/8/data", bridge, request_id="one2", transport="t"
            )
    assert read["contents"][0]["uri"] == "test://template/7/data"
    [record] = records(started, request_id="one1")
    assert (record["outcome"], record["policies"]) == ("allowed", ["max-reads-seven"])


async def test_arguments_nested_too_deep_are_refused_and_audited(
    started: Runtime, bridge: Any
) -> None:
    deep: Any = "x"
    for _ in range(300):  # orjson writes no more than 254 levels
        deep = {"a": deep}
    jo = Principal("jo", frozenset({"notes"}))
    for tool in ("notes_add", "no_such_tool"):
        with pytest.raises(McpZeroError):
            await started.kernel.call_tool(
                jo, tool, {"text": deep}, bridge, request_id=f"deep-{tool}", transport="t"
            )
        [record] = records(started, request_id=f"deep-{tool}")
        assert record["outcome"] == "error"
    [nested] = records(started, request_id="deep-notes_add")
    assert nested["code"] == "invalid_params"


async def test_arguments_nest_253_levels_at_most(started: Runtime, bridge: Any) -> None:
    """253 levels reach the tool; 254, which a worker's frame cannot carry, are refused as
    what they are (as 255 and more are by the kernel), naming the limit, and audited."""

    def nested(levels: int) -> Any:
        value: Any = "x"
        for _ in range(levels):  # (the arguments object itself is the first level)
            value = {"a": value}
        return value

    kim = Principal("kim", frozenset({"conformance"}))
    done = await call(started, kim, "test_simple_text", nested(253), "d253", bridge)
    # it reached the plugin: its handler takes no arguments, and says so of this one
    assert "unexpected keyword argument 'a'" in done["content"][0]["text"]
    for levels in (254, 255):
        with pytest.raises(InvalidParams, match="253 levels"):
            await call(started, kim, "test_simple_text", nested(levels), f"d{levels}", bridge)
        [record] = records(started, request_id=f"d{levels}")
        assert record["code"] == "invalid_params"


async def test_an_integer_past_64_bits_is_refused_as_such(started: Runtime, bridge: Any) -> None:
    # (from the CLI's JSON; JSON parsers elsewhere read it as a float) — it was refused as
    # "nested too deep", which sent its sender looking for the wrong thing
    jo = Principal("jo", frozenset({"notes"}))
    with pytest.raises(InvalidParams, match="integer past 64 bits") as refused:
        await started.kernel.call_tool(
            jo, "notes_add", {"text": "x", "n": 2**70}, bridge, request_id="big", transport="t"
        )
    assert refused.value.data == {"path": "/arguments"}
    [record] = records(started, request_id="big")
    assert record["code"] == "invalid_params"


async def test_a_string_that_is_not_utf8_is_refused_as_such(started: Runtime, bridge: Any) -> None:
    # (from a Python caller: lone surrogates, bytes that were not UTF-8) — it was refused as
    # "an integer past 64 bits"
    jo = Principal("jo", frozenset({"notes"}))
    with pytest.raises(InvalidParams, match="not valid Unicode") as refused:
        await started.kernel.call_tool(
            jo, "notes_add", {"text": "bad\udcff"}, bridge, request_id="bad", transport="t"
        )
    assert refused.value.data == {"path": "/arguments"}
    [record] = records(started, request_id="bad")
    assert record["code"] == "invalid_params"


async def test_a_question_to_the_client_cut_off_by_a_cancel_is_audited(
    started: Runtime, bridge: Any
) -> None:
    asked = asyncio.Event()

    class Silent(type(bridge)):  # type: ignore[misc]
        async def request(self, method: str, params: Any, key: str | None = None) -> Any:
            asked.set()
            await asyncio.Event().wait()  # the client never answers

    kim = Principal("kim", frozenset({"conformance"}))
    task = asyncio.create_task(
        started.kernel.call_tool(
            kim, "test_sampling", {"prompt": "?"}, Silent(), request_id="cut", transport="t"
        )
    )
    with anyio.fail_after(TIMEOUT_S):
        await asked.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with anyio.fail_after(TIMEOUT_S):
        while len(records(started, request_id="cut")) < 2:
            await asyncio.sleep(0.02)
    verbs = {(r["verb"], r.get("code")) for r in records(started, request_id="cut")}
    assert verbs == {("call_tool", "cancelled"), ("client_request", "cancelled")}


def one_slot_copy(tmp_path: Path, source: Path) -> Path:
    """A copy of the plugin at ``source`` that runs one call at a time (max_concurrency 1)."""
    plugin = tmp_path / f"{source.name}-1"
    shutil.copytree(source, plugin, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = orjson.loads((plugin / "plugin.json").read_bytes())
    manifest["quotas"]["max_concurrency"] = 1
    (plugin / "plugin.json").write_bytes(orjson.dumps(manifest))
    return plugin


def announcing_plugin(tmp_path: Path, name: str, resources: tuple[str, ...] = ()) -> Path:
    """Plugin ``name`` serving ``resources`` and ``<name>_announce``, which announces a
    change of each URI of its argument ``uris`` (ctx.resource_updated)."""
    plugin = tmp_path / name
    plugin.mkdir()
    manifest = {
        "name": name,
        "version": "1.0.0",
        "abi": 1,
        "entry": f"{name}_plugin:plugin",
        "tools": [
            {"name": f"{name}_announce", "description": "d", "inputSchema": {"type": "object"}}
        ],
        "resources": [{"uri": uri, "name": f"r{i}"} for i, uri in enumerate(resources)],
    }
    (plugin / "plugin.json").write_bytes(orjson.dumps(manifest))
    code = [
        "from mcp_zero.plugin import Plugin",
        f"plugin = Plugin({name!r})",
        f"@plugin.tool({name + '_announce'!r})",
        "def announce(ctx, uris):",
        "    for uri in uris:",
        "        ctx.resource_updated(uri)",
    ]
    for i, uri in enumerate(resources):
        code += [f"@plugin.resource({uri!r})", f"def r{i}(ctx):", "    return ''"]
    (plugin / f"{name}_plugin.py").write_text("\n".join(code) + "\n")
    return plugin


async def test_a_plugin_announces_changes_of_its_own_resources_only_however_escaped(
    make_runtime: Any, tmp_path: Path, bridge: Any
) -> None:
    # Ownership was looked up in the spelling the plugin gave, the subscribers in normal
    # form: a plugin that declared mem://%61bc announced mem://abc, another plugin's, to its
    # subscribers; one that gave its own resource's other spelling was dropped (found by
    # review)
    runtime: Runtime = make_runtime()
    runtime.plugins.install(announcing_plugin(tmp_path, "vic", ("mem://abc", "http://h/%7Euser")))
    runtime.plugins.install(announcing_plugin(tmp_path, "evil"))
    await runtime.start()
    try:
        ada = Principal("ada", frozenset({"vic", "evil"}))
        uris = ["mem://abc", "mem://%61bc", "http://h/%7Euser", "http://h/%7euser"]
        await call(runtime, ada, "evil_announce", {"uris": uris}, "spoof", bridge)
        assert bridge.events == []
        await call(runtime, ada, "vic_announce", {"uris": uris}, "own", bridge)
        announced = ["mem://abc", "mem://abc", "http://h/~user", "http://h/~user"]
        assert bridge.events == [("resource_updated", uri) for uri in announced]
    finally:
        await runtime.aclose()


class SlowClient:
    """A client whose user takes their time: each request waits until ``answered`` is set."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer
        self.asked = asyncio.Event()
        self.answered = asyncio.Event()

    async def progress(self, progress: float, total: float | None, message: str | None) -> None:
        pass

    async def log(self, level: str, data: Any, logger: str | None) -> None:
        pass

    async def close_stream(self) -> None:
        pass

    async def resource_updated(self, uri: str) -> None:
        pass

    async def request(
        self, method: str, params: dict[str, Any], key: str | None = None
    ) -> dict[str, Any]:
        self.asked.set()
        await self.answered.wait()
        return self.answer


async def test_a_call_waiting_on_its_client_leaves_its_plugin_slot_to_others(
    make_runtime: Any, tmp_path: Path, bridge: Any
) -> None:
    runtime: Runtime = make_runtime()
    runtime.plugins.install(one_slot_copy(tmp_path, CONFORMANCE_DIR))
    client = SlowClient({"action": "accept", "content": {"username": "ada"}})
    asked, answered = client.asked, client.answered
    await runtime.start()
    try:
        ada = Principal("ada", frozenset({"conformance"}))
        waiting = asyncio.ensure_future(
            call(runtime, ada, "test_elicitation", {"message": "name?"}, "w", client)
        )
        with anyio.fail_after(TIMEOUT_S):
            await asked.wait()
        bob = Principal("bob", frozenset({"conformance"}))
        with anyio.fail_after(5):  # the plugin's one slot is not held by the waiting call
            simple = await call(runtime, bob, "test_simple_text", {}, "s", bridge)
        assert simple["content"][0]["type"] == "text"
        answered.set()  # then the waiting call takes the slot again, and finishes
        assert "action=accept" in (await waiting)["content"][0]["text"]
    finally:
        await runtime.aclose()


async def test_each_record_names_the_policy_set_that_decided_it(
    make_runtime: Any, bridge: Any
) -> None:
    """A decision's records name the policy set that made it (``policies_sha256``, as the
    set's ``load_policies`` record has it): with sets changing under load, the order of the
    records proved nothing of which set decided a call (found by review). A call decided
    before another set came into force, and recorded after, names the set that decided it."""
    runtime: Runtime = make_runtime()
    runtime.plugins.install(CONFORMANCE_DIR)
    runtime.plugins.install(FAULTY_DIR)
    # (the start of a server but for its watcher, whose steps are taken here)
    runtime.record_what_governs()
    await runtime.plugins.refresh(force=True)
    try:
        first = runtime.policy.engine.digest
        ada = Principal("ada", frozenset({"conformance", "faulty"}))
        client = SlowClient({"action": "accept", "content": {"username": "ada"}})
        asking = asyncio.ensure_future(
            call(runtime, ada, "test_elicitation", {"message": "name?"}, "before", client)
        )
        with anyio.fail_after(TIMEOUT_S):
            await client.asked.wait()  # the call, and its question to the client, decided
        (runtime.settings.policy_dir / "no-echo.cedar").write_text(
            '@id("no-echo")\nforbid (principal, action, resource == Tool::"faulty_echo");\n'
        )
        assert not await runtime.refresh_policies()  # (seen once)
        assert await runtime.refresh_policies()
        second = runtime.policy.engine.digest
        with pytest.raises(PolicyDenied):
            await call(runtime, ada, "faulty_echo", {"text": "x"}, "after", bridge)
        await runtime.kernel.subscribe(
            ada,
            ["faulty://counter"],
            method="resources/subscribe",
            request_id="after",
            transport="t",
        )
        client.answered.set()
        with anyio.fail_after(TIMEOUT_S):
            assert "action=accept" in (await asking)["content"][0]["text"]
        loaded = [r["policies_sha256"] for r in records(runtime, verb="load_policies")]
        decided = {
            rid: [
                (r["verb"], r["outcome"], r["policies_sha256"])
                for r in records(runtime, request_id=rid)
            ]
            for rid in ("before", "after")
        }
    finally:
        await runtime.aclose()
    assert first != second
    assert loaded == [first, second]
    assert decided == {
        "before": [("client_request", "allowed", first), ("call_tool", "allowed", first)],
        "after": [("call_tool", "denied", second), ("read_resource", "allowed", second)],
    }
    verified = CliRunner().invoke(
        main, ["audit", "verify", "--json", "--data-dir", str(runtime.settings.data_dir)]
    )
    assert verified.exit_code == 0, verified.output
    assert orjson.loads(verified.output)["ok"] is True


async def test_a_request_a_plugin_may_not_make_of_its_client_is_refused_before_policy(
    make_runtime: Any, bridge: Any
) -> None:
    # It was decided by Cedar (and allowed), then refused and audited as "internal", its
    # 200,000-character method recorded whole (found by review)
    runtime: Runtime = make_runtime()
    runtime.plugins.install(KIT_DIR)
    await runtime.start()
    try:
        ada = Principal("ada", frozenset({"kit"}))
        method = "x" * 200_000
        result = await call(runtime, ada, "ask_client", {"method": method}, "bad-ask", bridge)
        text = result["content"][0]["text"]
        assert text.startswith("refused: plugins may not send 'xxx")
        assert "sampling/createMessage, elicitation/create, roots/list" in text
        assert len(text) < 400
        [asked] = records(runtime, request_id="bad-ask", verb="client_request")
        assert (asked["outcome"], asked["code"]) == ("error", "invalid_params")
        assert asked["resource"] == method[:256]
        assert "policies" not in asked
    finally:
        await runtime.aclose()


async def test_a_result_nested_deeper_than_an_answer_can_carry_is_a_failure_on_record(
    make_runtime: Any, tmp_path: Path, bridge: Any
) -> None:
    # Its answer could not be written (an HTTP 500, a cut stream, none over stdio) while its
    # record said allowed (found by review)
    runtime: Runtime = make_runtime()
    runtime.plugins.install(forging_plugin(tmp_path / "forger"))
    await runtime.start()
    try:
        ada = Principal("ada", frozenset({"forger"}))
        with pytest.raises(PluginFailure, match="nests deeper than 253 levels"):
            await call(runtime, ada, "deep", {"depth": 300}, "deep", bridge)
        [record] = records(runtime, request_id="deep")
        assert (record["outcome"], record["code"]) == ("error", "plugin_failure")
    finally:
        await runtime.aclose()


async def test_each_request_to_the_client_takes_a_token_of_the_agents_rate_limit(
    make_runtime: Any, tmp_path: Path, bridge: Any
) -> None:
    # Each is audited: without a token each, one call could leave records without limit
    runtime: Runtime = make_runtime(rate_limit=0.001, rate_burst=3)
    runtime.plugins.install(asking_plugin(tmp_path / "asker"))
    await runtime.start()
    try:
        ada = Principal("ada", frozenset({"asker"}))
        args = {"n": 4, "method": "sampling/createMessage"}
        result = await call(runtime, ada, "ask_in_turn", args, "asks", bridge)
        assert result["structuredContent"]["answered"] == 2  # (the call took the first)
        refused = result["structuredContent"]["refused"]  # (each with its retry_after)
        assert refused
        assert all(r.startswith('agent "ada" is over its rate limit') for r in refused)
        asked = records(runtime, request_id="asks", verb="client_request")
        assert [(r["outcome"], r.get("code")) for r in asked] == [
            ("allowed", None),
            ("allowed", None),
            ("error", "rate_limited"),
            ("error", "rate_limited"),
        ]
    finally:
        await runtime.aclose()


async def test_a_request_to_the_client_that_policy_denies_is_counted_as_a_denial(
    make_runtime: Any, bridge: Any
) -> None:
    # audited, but missing from mcp0_policy_denials_total (found by review)
    runtime: Runtime = make_runtime()
    runtime.plugins.install(KIT_DIR)
    (runtime.settings.policy_dir / "no-roots.cedar").write_text(
        '@id("no-roots")\nforbid (principal, action == Action::"client_request", '
        'resource == ClientRequest::"roots/list");\n'
    )
    runtime.policy.reload()
    await runtime.start()
    try:
        ada = Principal("ada", frozenset({"kit"}))
        result = await call(runtime, ada, "ask_client", {"method": "roots/list"}, "r", bridge)
        assert result["content"][0]["text"].startswith("refused: ")
        [asked] = records(runtime, request_id="r", verb="client_request")
        assert asked["outcome"] == "denied"
        metrics = runtime.metrics.render()[0].decode()
        assert 'mcp0_policy_denials_total{policy="no-roots"} 1' in metrics
    finally:
        await runtime.aclose()


async def test_a_call_cut_by_the_servers_max_timeout_names_that_setting(
    make_runtime: Any, bridge: Any
) -> None:
    # It advised raising the plugin's timeout_ms, which cannot help (found by review)
    runtime: Runtime = make_runtime(max_timeout_s=0.3)
    runtime.plugins.install(KIT_DIR)  # timeout_ms 5000
    await runtime.start()
    try:
        ada = Principal("ada", frozenset({"kit"}))
        with pytest.raises(ToolTimeout) as caught:
            await call(runtime, ada, "hang_async", {}, "t", bridge)
        message = str(caught.value)
        assert "max_timeout_s (0.3 s) cut the plugin's timeout_ms (5000 ms)" in message
        assert "raise the plugin's timeout_ms" not in message
    finally:
        await runtime.aclose()


async def test_a_plain_handler_waiting_on_its_client_keeps_its_slot_and_thread(
    make_runtime: Any, tmp_path: Path, bridge: Any
) -> None:
    # A plain handler's worker thread waits with it (the worker has max_concurrency
    # threads): had it given its slot away, the next plain call would wait for that thread
    # while the answered call waited for the slot, until a timeout killed the worker.
    runtime: Runtime = make_runtime()
    runtime.plugins.install(one_slot_copy(tmp_path, KIT_DIR))
    sampled = {"role": "assistant", "content": {"type": "text", "text": "42"}, "model": "m"}
    client = SlowClient(sampled)
    await runtime.start()
    try:
        ada = Principal("ada", frozenset({"kit"}))
        waiting = asyncio.ensure_future(
            call(runtime, ada, "chatty_sync", {"question": "meaning?"}, "w", client)
        )
        with anyio.fail_after(TIMEOUT_S):
            await client.asked.wait()
        bob = await new_agent(runtime, "bob", "kit")
        queued = asyncio.ensure_future(call(runtime, bob, "echo", {"text": "b"}, "e", bridge))
        await anyio.sleep(0.2)
        assert not queued.done()  # it waits for the slot, not for a thread in the worker
        client.answered.set()
        with anyio.fail_after(4):  # (before kit's 5 s timeout)
            answered = await waiting
            echoed = await queued
        assert "42" in orjson.dumps(answered).decode()
        assert echoed["content"] == [{"type": "text", "text": "b"}]
    finally:
        await runtime.aclose()


async def test_a_cancelled_call_keeps_its_slot_and_counts_for_its_agent_until_its_handler_ends(
    make_runtime: Any, tmp_path: Path, bridge: Any
) -> None:
    # Its slot was given back as the call was cancelled while its handler (slow to heed the
    # cancel) ran on: a client that cancelled calls and sent them again had the plugin run
    # more than its max_concurrency at once (found by review). Then the slot was kept but the
    # agent's count of calls in flight was not: an agent allowed one call held every slot of
    # a plugin by cancelling and sending again (found by review)
    runtime: Runtime = make_runtime()
    runtime.plugins.install(one_slot_copy(tmp_path, KIT_DIR))
    await runtime.start()
    try:
        ada = await new_agent(runtime, "ada", "kit")
        stubborn = asyncio.ensure_future(call(runtime, ada, "stubborn", {}, "c", bridge))
        with anyio.fail_after(TIMEOUT_S):
            while ("progress", 1) not in bridge.events:  # its handler runs
                await anyio.sleep(0.01)
        stubborn.cancel()
        with anyio.fail_after(1), pytest.raises(asyncio.CancelledError):
            await stubborn  # answered at once
        assert runtime.quotas.inflight("ada") == 1  # its handler still counts for her
        again = asyncio.ensure_future(call(runtime, ada, "aecho", {}, "a", bridge))
        await anyio.sleep(0.3)
        assert not again.done()  # the plugin's one slot is still the running handler's
        (runtime.settings.data_dir / "plugin-data" / "kit" / "gate").touch()
        with anyio.fail_after(4):
            assert (await again)["structuredContent"] == {"text": "hi", "agent": "ada"}
        assert runtime.quotas.inflight("ada") == 0
        assert [r["code"] for r in records(runtime, request_id="c")] == ["cancelled"]
    finally:
        await runtime.aclose()


async def test_a_call_cancelled_while_it_asks_its_client_keeps_a_slot_until_its_handler_ends(
    make_runtime: Any, tmp_path: Path, bridge: Any
) -> None:
    # It had given its slot back to wait for the answer, and did not take one again as it
    # ended though its handler, told to stop, still ran (found by review)
    runtime: Runtime = make_runtime()
    runtime.plugins.install(one_slot_copy(tmp_path, KIT_DIR))
    client = SlowClient({"roots": []})  # (never answered)
    await runtime.start()
    try:
        ada = await new_agent(runtime, "ada", "kit")
        asking = asyncio.ensure_future(call(runtime, ada, "ask_stubbornly", {}, "c", client))
        with anyio.fail_after(TIMEOUT_S):
            await client.asked.wait()
        asking.cancel()
        with anyio.fail_after(1), pytest.raises(asyncio.CancelledError):
            await asking  # answered at once
        again = asyncio.ensure_future(call(runtime, ada, "aecho", {}, "a", bridge))
        await anyio.sleep(0.3)
        assert not again.done()  # the plugin's one slot is the running handler's again
        (runtime.settings.data_dir / "plugin-data" / "kit" / "gate").touch()
        with anyio.fail_after(4):
            assert (await again)["structuredContent"] == {"text": "hi", "agent": "ada"}
        assert runtime.quotas.inflight("ada") == 0
    finally:
        await runtime.aclose()


@contextlib.asynccontextmanager
async def slot_held(
    runtime: Runtime, tmp_path: Path
) -> AsyncIterator[tuple[Principal, SlowClient, Path]]:
    """``runtime`` started with a one-slot copy of the kit (its directory yielded), agent ada
    made with it attached, and its slot held by her plain call that waits on its client until
    the client yielded is answered (at the end, if not before; the runtime closed after)."""
    kit = one_slot_copy(tmp_path, KIT_DIR)
    runtime.plugins.install(kit)
    client = SlowClient({"role": "assistant", "content": {"type": "text", "text": "42"}})
    await runtime.start()
    try:
        ada = await new_agent(runtime, "ada", "kit")
        holder = asyncio.ensure_future(
            call(runtime, ada, "chatty_sync", {"question": "?"}, "holder", client)
        )
        with anyio.fail_after(TIMEOUT_S):
            await client.asked.wait()  # (a plain handler's call keeps its slot meanwhile)
        yield ada, client, kit
        client.answered.set()
        await holder
    finally:
        await runtime.aclose()


async def queue_one(runtime: Runtime, principal: Principal, bridge: Any) -> asyncio.Future[Any]:
    """An echo call of ``principal``'s, once it queues for the kit's slot."""
    queued = asyncio.ensure_future(call(runtime, principal, "echo", {"text": "q"}, "q", bridge))
    with anyio.fail_after(TIMEOUT_S):
        while runtime.quotas.inflight(principal.agent) < 2:  # (the holder's, and this one)
            await asyncio.sleep(0.01)
    return queued


NO_ECHO = """
@id("no-echo")
@reason("echo is off")
forbid (principal, action, resource == Tool::"echo");
"""


async def test_a_call_queued_for_a_slot_is_decided_again_by_a_policy_put_in_force_meanwhile(
    make_runtime: Any, tmp_path: Path, bridge: Any
) -> None:
    # It ran, audited as allowed by the policies of before, after the forbid's load_policies
    # record and after new calls were denied by it (found by review)
    runtime: Runtime = make_runtime()
    async with slot_held(runtime, tmp_path) as (ada, client, _):
        queued = await queue_one(runtime, ada, bridge)
        (runtime.settings.policy_dir / "no-echo.cedar").write_text(NO_ECHO)
        runtime.policy.reload()
        client.answered.set()
        with anyio.fail_after(TIMEOUT_S), pytest.raises(PolicyDenied) as denied:
            await queued
        [record] = records(runtime, request_id="q")
    assert denied.value.data is not None
    assert denied.value.data["policies"] == ["no-echo"]
    assert (record["outcome"], record["policies"]) == ("denied", ["no-echo"])
    assert record["policies_sha256"] == runtime.policy.engine.digest  # (the set with no-echo)


async def test_a_call_that_waited_for_its_worker_to_start_is_decided_again(
    make_runtime: Any, tmp_path: Path, bridge: Any
) -> None:
    # A call that waited for its plugin's worker to start (after a crash, a slow import) ran
    # on the decision made before it waited: a forbid put in force meanwhile did not stop it
    # (found by review)
    runtime: Runtime = make_runtime()
    gate = runtime.settings.plugin_data_dir / "gated" / "gate"
    runtime.plugins.install(gated_plugin(tmp_path / "gated", gate))
    await runtime.start(wait=0)  # (its worker waits for the gate)
    try:
        ada = await new_agent(runtime, "ada", "gated")
        waiting = asyncio.ensure_future(
            call(runtime, ada, "gated_echo", {"text": "hi"}, "w", bridge)
        )
        await asyncio.sleep(0.3)
        assert not waiting.done()  # (its worker is starting)
        (runtime.settings.policy_dir / "no-gated.cedar").write_text(
            '@id("no-gated")\nforbid (principal, action == Action::"call_tool", '
            'resource == Tool::"gated_echo");\n'
        )
        runtime.policy.reload()
        gate.touch()
        with anyio.fail_after(TIMEOUT_S), pytest.raises(PolicyDenied) as denied:
            await waiting
        [record] = records(runtime, request_id="w")
    finally:
        await runtime.aclose()
    assert denied.value.data is not None
    assert denied.value.data["policies"] == ["no-gated"]
    assert (record["outcome"], record["policies"]) == ("denied", ["no-gated"])


async def test_a_call_queued_for_a_plugin_removed_and_installed_again_is_not_run_by_the_new_one(
    make_runtime: Any, tmp_path: Path, bridge: Any
) -> None:
    # The plugin installed again is attached to no one; the queued call ran on it, allowed by
    # the attachment of the plugin removed (found by review)
    runtime: Runtime = make_runtime()
    async with slot_held(runtime, tmp_path) as (ada, client, kit):
        queued = await queue_one(runtime, ada, bridge)
        assert runtime.remove_plugin("kit").detached == ["ada"]
        runtime.install_plugin(kit)
        with anyio.fail_after(TIMEOUT_S):
            assert await runtime.plugins.refresh() is True
        client.answered.set()
        with anyio.fail_after(TIMEOUT_S), pytest.raises(PolicyDenied) as denied:
            await queued
        [record] = records(runtime, request_id="q")
    assert "attached: none" in denied.value.message
    assert (record["outcome"], record["policies"]) == ("denied", ["attached-plugins-only"])


async def test_a_call_queued_for_a_slot_whose_agent_was_terminated_meanwhile_does_not_run(
    make_runtime: Any, tmp_path: Path, bridge: Any
) -> None:
    runtime: Runtime = make_runtime()
    async with slot_held(runtime, tmp_path) as (ada, client, _):
        queued = await queue_one(runtime, ada, bridge)
        await runtime.agents.terminate("ada")
        client.answered.set()
        with anyio.fail_after(TIMEOUT_S), pytest.raises(Unauthorized):
            await queued
        [record] = records(runtime, request_id="q")
    assert (record["outcome"], record["code"]) == ("error", "unauthorized")
    # no decision refused it: the record names none (it named the permit of the first)
    assert not {"policies", "policies_sha256"} & set(record)


AUDITED_FIRST = """
@id("echo-audited-first")
@audit("before")
permit (principal is Agent, action == Action::"call_tool", resource == Tool::"echo")
when { principal.plugins.contains(resource.plugin) };
"""


NO_ASKING_WITH_VIC = """
@id("no-asking-with-vic")
forbid (principal, action == Action::"client_request", resource)
when { principal.plugins.contains("vic") };
"""


async def test_a_call_decided_again_asks_its_client_as_the_principal_of_that_decision(
    make_runtime: Any, tmp_path: Path, bridge: Any
) -> None:
    # Its questions to the client were decided for the principal it started with: an agent
    # given another plugin while the call queued asked as it was before (found by review)
    runtime: Runtime = make_runtime()
    async with slot_held(runtime, tmp_path) as (ada, client, _):
        runtime.install_plugin(announcing_plugin(tmp_path, "vic"))
        with anyio.fail_after(TIMEOUT_S):
            assert await runtime.plugins.refresh() is True
        (runtime.settings.policy_dir / "no-asking.cedar").write_text(NO_ASKING_WITH_VIC)
        runtime.policy.reload()
        method = "sampling/createMessage"
        queued = asyncio.ensure_future(
            call(runtime, ada, "ask_client", {"method": method}, "a", bridge)
        )
        with anyio.fail_after(TIMEOUT_S):
            while runtime.quotas.inflight("ada") < 2:  # (the holder's, and this one)
                await asyncio.sleep(0.01)
        await runtime.agents.attach("ada", "vic")
        client.answered.set()
        with anyio.fail_after(TIMEOUT_S):
            answer = await queued
        [asked] = records(runtime, request_id="a", verb="client_request")
    assert answer["content"][0]["text"].startswith("refused:")
    assert (asked["outcome"], asked["policies"]) == ("denied", ["no-asking-with-vic"])


async def test_a_call_queued_for_a_slot_meets_an_audit_before_obligation_put_in_force_meanwhile(
    make_runtime: Any, tmp_path: Path, bridge: Any
) -> None:
    runtime: Runtime = make_runtime()
    async with slot_held(runtime, tmp_path) as (ada, client, _):
        queued = await queue_one(runtime, ada, bridge)
        (runtime.settings.policy_dir / "audited.cedar").write_text(AUDITED_FIRST)
        runtime.policy.reload()
        client.answered.set()
        with anyio.fail_after(TIMEOUT_S):
            assert (await queued)["content"] == [{"type": "text", "text": "q"}]
        intent, outcome = records(runtime, request_id="q")
    assert (intent["outcome"], outcome["outcome"]) == ("intent", "allowed")
    assert outcome["obligations"] == ["audit:before"]
    assert "echo-audited-first" in outcome["policies"]


async def test_a_call_is_decided_again_by_a_policy_put_in_force_while_its_intent_is_recorded(
    make_runtime: Any, bridge: Any
) -> None:
    # (a long batching window: the intent's record waits in it while the forbid comes)
    runtime: Runtime = make_runtime(audit_window_ms=300)
    runtime.plugins.install(KIT_DIR)
    (runtime.settings.policy_dir / "audited.cedar").write_text(AUDITED_FIRST)
    runtime.policy.reload()
    await runtime.start()
    try:
        ada = await new_agent(runtime, "ada", "kit")
        running = asyncio.ensure_future(call(runtime, ada, "echo", {"text": "i"}, "i", bridge))
        await asyncio.sleep(0)  # its first step: decided, its intent submitted
        (runtime.settings.policy_dir / "no-echo.cedar").write_text(NO_ECHO)
        runtime.policy.reload()
        with anyio.fail_after(TIMEOUT_S), pytest.raises(PolicyDenied):
            await running
        intent, outcome = records(runtime, request_id="i")
    finally:
        await runtime.aclose()
    assert (intent["outcome"], outcome["outcome"]) == ("intent", "denied")
    assert outcome["policies"] == ["no-echo"]


async def test_a_call_queued_while_its_plugin_is_replaced_is_checked_and_run_by_the_new_one(
    make_runtime: Any, tmp_path: Path, bridge: Any
) -> None:
    # It was checked against the old inputSchema, then run by the new code; its timeout was
    # the old manifest's too, and a prompt's arguments were checked as it declared them (found
    # by review)
    runtime: Runtime = make_runtime()
    async with slot_held(runtime, tmp_path) as (ada, client, kit):
        stricter = tmp_path / "kit-2"
        shutil.copytree(kit, stricter)
        manifest = orjson.loads((stricter / "plugin.json").read_bytes())
        manifest["quotas"]["timeout_ms"] = 1500  # (the old: 5,000)
        [echo] = [tool for tool in manifest["tools"] if tool["name"] == "echo"]
        echo["inputSchema"] = {"type": "object", "properties": {"text": {"maxLength": 1}}}
        [greet] = [prompt for prompt in manifest["prompts"] if prompt["name"] == "greet"]
        greet["arguments"].append({"name": "title", "required": True})
        (stricter / "plugin.json").write_bytes(orjson.dumps(manifest))
        queued = await queue_one(runtime, ada, bridge)  # {"text": "q"}: valid in both
        too_long = asyncio.ensure_future(call(runtime, ada, "echo", {"text": "long"}, "l", bridge))
        prompt = asyncio.ensure_future(
            runtime.kernel.get_prompt(
                ada, "greet", {"name": "x"}, bridge, request_id="p", transport="test"
            )
        )
        slow = asyncio.ensure_future(call(runtime, ada, "slow_sync", {"seconds": 3}, "s", bridge))
        with anyio.fail_after(TIMEOUT_S):
            while runtime.quotas.inflight("ada") < 5:
                await asyncio.sleep(0.01)
        runtime.install_plugin(stricter, replace=True)
        with anyio.fail_after(TIMEOUT_S):
            assert await runtime.plugins.refresh() is True
        client.answered.set()
        with anyio.fail_after(TIMEOUT_S):
            assert (await queued)["content"] == [{"type": "text", "text": "q"}]
            with pytest.raises(InvalidParams) as refused:
                await too_long
            with pytest.raises(InvalidParams) as unprompted:
                await prompt
            with pytest.raises(ToolTimeout):
                await slow
    assert refused.value.data == {"path": "/text", "schemaPath": "/properties/text/maxLength"}
    assert unprompted.value.data == {"path": "/arguments/title"}


def overlapping_plugin(directory: Path, max_concurrency: int) -> Path:
    """Plugin "overlap" at ``directory``, with ``max_concurrency`` slots: ``hold`` keeps its
    slot (a plain handler) until its client answers; ``overlap`` runs for a moment and
    returns the most of its calls its worker ever ran at once."""
    return write_plugin(
        directory,
        "overlap",
        "import asyncio\n"
        "from mcp_zero.plugin import Plugin\n"
        "plugin = Plugin('overlap')\n"
        "running = most = 0\n"
        "@plugin.tool('hold')\n"
        "def hold(ctx):\n"
        "    return ctx.sample_sync('?')\n"
        "@plugin.tool('overlap')\n"
        "async def overlap(ctx):\n"
        "    global running, most\n"
        "    running += 1\n"
        "    most = max(most, running)\n"
        "    await asyncio.sleep(0.2)\n"
        "    running -= 1\n"
        "    return str(most)\n",
        ["hold", "overlap"],
        version=f"{max_concurrency}.0.0",
        quotas={"max_concurrency": max_concurrency},
    )


@contextlib.asynccontextmanager
async def overlap_running(
    make_runtime: Any, directory: Path, max_concurrency: int
) -> AsyncIterator[tuple[Runtime, Principal, SlowClient]]:
    """A started runtime with plugin "overlap" (``overlapping_plugin``) attached to agent ada,
    and the client its ``hold`` calls wait on (they do until ``client.answered`` is set)."""
    runtime: Runtime = make_runtime()
    runtime.plugins.install(overlapping_plugin(directory, max_concurrency))
    client = SlowClient({"role": "assistant", "content": {"type": "text", "text": "42"}})
    await runtime.start()
    try:
        yield runtime, await new_agent(runtime, "ada", "overlap"), client
    finally:
        await runtime.aclose()


async def test_calls_queued_while_their_plugin_is_replaced_count_against_the_new_versions_slots(
    make_runtime: Any, tmp_path: Path, bridge: Any
) -> None:
    # They took the old version's slots as its calls ended: lowering max_concurrency from 2
    # to 1 let two of them run at once on the new one (found by review)
    async with overlap_running(make_runtime, tmp_path / "two", 2) as (runtime, ada, client):
        holders = [
            asyncio.ensure_future(call(runtime, ada, "hold", {}, f"h{i}", client)) for i in range(2)
        ]
        queued = []
        for i in range(2):
            queued.append(asyncio.ensure_future(call(runtime, ada, "overlap", {}, f"q{i}", bridge)))
            with anyio.fail_after(TIMEOUT_S):
                while runtime.quotas.inflight("ada") < 3 + i:  # (the holders', and these)
                    await asyncio.sleep(0.01)
        runtime.install_plugin(overlapping_plugin(tmp_path / "one", 1), replace=True)
        with anyio.fail_after(TIMEOUT_S):
            assert await runtime.plugins.refresh() is True
            client.answered.set()
            answers = [(await q)["content"][0]["text"] for q in queued]
            await asyncio.gather(*holders)
    assert answers == ["1", "1"]


async def test_a_call_queued_when_its_plugin_is_replaced_goes_to_the_new_version_at_once(
    make_runtime: Any, tmp_path: Path, bridge: Any
) -> None:
    # It moved to the new version's slots only once handed one of the old version's: the
    # new version idle, it waited behind an old call waiting on its client, until that
    # client answered (found by review)
    async with overlap_running(make_runtime, tmp_path / "one", 1) as (runtime, ada, client):
        holder = asyncio.ensure_future(call(runtime, ada, "hold", {}, "h", client))
        with anyio.fail_after(TIMEOUT_S):
            await client.asked.wait()  # (the holder has the one slot)
            queued = asyncio.ensure_future(call(runtime, ada, "overlap", {}, "q", bridge))
            while runtime.quotas.inflight("ada") < 2:
                await asyncio.sleep(0.01)
            runtime.install_plugin(overlapping_plugin(tmp_path / "again", 1), replace=True)
            assert await runtime.plugins.refresh() is True
            assert (await queued)["content"][0]["text"] == "1"
        assert not holder.done()  # still waiting on its client, on the old version's slot
        client.answered.set()
        with anyio.fail_after(TIMEOUT_S):
            await holder


# -- PluginSlot: the accounting of one call's slot -------------------------------------------


async def free_slots(slots: PluginSlots) -> int:
    """How many slots could be taken now (a release too many shows as one more)."""
    taken = 0
    while slots.take_free():
        taken += 1
    for _ in range(taken):
        slots.give()
    return taken


def locked(slots: PluginSlots) -> bool:
    """Whether a call would have to queue for a slot now."""
    if slots.take_free():
        slots.give()
        return False
    return True


async def test_a_slot_is_free_while_questions_are_open_and_taken_again_after_the_last() -> None:
    slots = PluginSlots(1)
    await slots.take("ada")
    slot = PluginSlot(slots, "ada")
    slot.client_wait_started()
    slot.client_wait_started()  # two questions at once (asyncio.gather)
    assert not locked(slots)
    await slot.client_wait_ended()  # one answered: the other still waits on the client
    assert not locked(slots)
    await slot.client_wait_ended()
    assert locked(slots)  # the call runs again
    slot.close()
    assert not locked(slots)
    slot.close()  # (twice is harmless: one release)
    assert await free_slots(slots) == 1


async def test_an_answered_call_queues_for_its_slot_and_leaks_none_when_it_ends() -> None:
    slots = PluginSlots(1)
    await slots.take("ada")
    slot = PluginSlot(slots, "ada")
    slot.client_wait_started()
    await slots.take("bob")  # another call takes the free slot
    regain = asyncio.ensure_future(slot.client_wait_ended())
    await asyncio.sleep(0)
    assert not regain.done()  # queued behind the running call
    slot.close()  # the waiting call ends (timeout) meanwhile
    slots.give()  # the other call finishes
    with anyio.fail_after(5):
        await regain
    assert await free_slots(slots) == 1  # nothing kept by the ended call


async def test_a_call_that_asks_again_while_it_queues_for_its_slot_does_not_keep_it() -> None:
    slots = PluginSlots(1)
    await slots.take("ada")
    slot = PluginSlot(slots, "ada")
    slot.client_wait_started()
    await slots.take("ada")
    regain = asyncio.ensure_future(slot.client_wait_ended())
    await asyncio.sleep(0)
    slot.client_wait_started()  # a second question while the first answer queues
    slots.give()
    with anyio.fail_after(5):
        await regain
    assert not locked(slots)  # free while that question is open
    await slot.client_wait_ended()
    assert locked(slots)
    slot.close()
    assert await free_slots(slots) == 1


async def test_a_handler_cut_off_while_its_call_asks_its_client_takes_a_slot_back_at_once() -> None:
    # (it cannot queue: it runs) another call took its slot meanwhile: the next slot given
    # back is owed to it, not to a call that queues
    slots = PluginSlots(1)
    await slots.take("ada")
    slot = PluginSlot(slots, "ada")
    slot.client_wait_started()
    await slots.take("bob")
    queued = asyncio.ensure_future(slots.take("cy"))
    await asyncio.sleep(0)
    ended = slot.handler_runs_on()  # ada's call is cancelled while it asks
    slot.client_wait_dropped()
    slot.close()
    slots.give()  # bob's call ends: its slot pays for ada's handler
    await asyncio.sleep(0)
    assert not queued.done()
    ended()  # ada's handler ends
    with anyio.fail_after(5):
        await queued
    slots.give()
    assert await free_slots(slots) == 1  # nothing lost, nothing made


async def test_plugin_slots_go_to_queued_calls_in_turn_and_a_cancelled_one_passes_its_on() -> None:
    slots = PluginSlots(1)
    assert slots.take_free()
    order: list[str] = []

    async def call(name: str) -> None:
        await slots.take("ada")
        order.append(name)

    first = asyncio.ensure_future(call("first"))
    second = asyncio.ensure_future(call("second"))
    third = asyncio.ensure_future(call("third"))
    await asyncio.sleep(0)
    assert not slots.take_free()  # taken, and calls queue
    second.cancel()  # gives up while it queues: it is passed over
    slots.give()  # to the first in line
    first.cancel()  # ... which is cancelled before it runs: the slot goes on
    with anyio.fail_after(5):
        await third
    assert order == ["third"]
    assert first.cancelled()
    assert second.cancelled()
    slots.give()  # the third call ends
    assert await free_slots(slots) == 1  # nothing lost, nothing made


async def test_agents_queuing_for_a_busy_plugin_take_turns() -> None:
    # One agent kept 16 calls queued on a 2-slot plugin and another agent's calls waited
    # behind all of them, out to their time limit (found by review): slots go round the
    # agents that queue, each agent's own calls in order
    slots = PluginSlots(1)
    assert slots.take_free()
    order: list[str] = []

    async def call(agent: str, name: str) -> None:
        await slots.take(agent)
        order.append(name)
        slots.give()

    calls = [asyncio.ensure_future(call("hog", f"hog{i}")) for i in range(4)]
    await asyncio.sleep(0)
    calls.append(asyncio.ensure_future(call("bob", "bob0")))
    calls.append(asyncio.ensure_future(call("bob", "bob1")))
    await asyncio.sleep(0)
    slots.give()
    with anyio.fail_after(5):
        await asyncio.gather(*calls)
    assert order == ["hog0", "bob0", "hog1", "bob1", "hog2", "hog3"]
    assert await free_slots(slots) == 1


async def test_a_cancelled_call_leaves_its_agents_turn_to_the_next_agent() -> None:
    slots = PluginSlots(1)
    assert slots.take_free()
    order: list[str] = []

    async def call(agent: str) -> None:
        await slots.take(agent)
        order.append(agent)

    ada = asyncio.ensure_future(call("ada"))
    bob = asyncio.ensure_future(call("bob"))
    await asyncio.sleep(0)
    ada.cancel()  # its agent queues no more: not met, not counted
    await asyncio.sleep(0)
    slots.give()
    with anyio.fail_after(5):
        await bob
    assert order == ["bob"]
    slots.give()
    assert await free_slots(slots) == 1


@contextlib.asynccontextmanager
async def one_slot_taken(
    runtime: Runtime, tmp_path: Path, bridge: Any, seconds: float
) -> AsyncIterator[tuple[Runtime, Principal]]:
    """``runtime`` started with a one-slot copy of the kit, its slot taken by agent ada's
    slow_sync call of ``seconds`` for the block (the call awaited after it, the runtime
    closed)."""
    runtime.plugins.install(one_slot_copy(tmp_path, KIT_DIR))
    await runtime.start()
    try:
        ada = await new_agent(runtime, "ada", "kit")
        first = asyncio.ensure_future(
            call(runtime, ada, "slow_sync", {"seconds": seconds}, "first", bridge)
        )
        await anyio.sleep(0.2)  # running: the plugin's one slot is taken
        yield runtime, ada
        await first
    finally:
        await runtime.aclose()


async def test_the_time_a_call_queued_for_a_slot_is_the_quota_stage(
    make_runtime: Any, tmp_path: Path, bridge: Any
) -> None:
    # mcp0_stage_seconds{stage="quota"} (and "ratelimit") were exported and never observed
    # (found by review)
    async with one_slot_taken(make_runtime(), tmp_path, bridge, 0.5) as (runtime, ada):
        await call(runtime, ada, "echo", {"text": "b"}, "second", bridge)
    text = runtime.metrics.render()[0].decode()
    assert 'mcp0_stage_seconds_count{stage="quota"} 1' in text
    assert 'stage="ratelimit"' not in text


@pytest.mark.slow
async def test_a_queued_call_that_times_out_says_how_long_it_queued(
    make_runtime: Any, tmp_path: Path, bridge: Any
) -> None:
    # It said it "did not finish within 0.03 s; raise the plugin's timeout_ms", the quota
    # being 3 s: the rest went to queueing for a slot (found by review)
    async with one_slot_taken(make_runtime(), tmp_path, bridge, 3) as (runtime, ada):
        with anyio.fail_after(TIMEOUT_S), pytest.raises(ToolTimeout) as timed_out:
            await call(runtime, ada, "slow_sync", {"seconds": 3}, "second", bridge)
    # and its limit, left by the wait, unrounded: "within 0.997701 s" (found by review)
    assert re.search(
        r"did not finish within \d+(\.\d\d?)? s; .* \(it waited \d+(\.\d\d?)? s of its 5 s "
        r"limit for a free slot: the plugin runs 1 call at a time, its max_concurrency\)$",
        timed_out.value.message,
    ), timed_out.value.message


async def test_retired_slots_send_queued_new_calls_on_and_keep_calls_taking_theirs_back() -> None:
    # A replace woke the calls queuing for the old version's slots: those that have not
    # begun go to the new version's; one taking its slot back after its client answered
    # runs on the old worker, and stays (found by review)
    slots = PluginSlots(1)
    await slots.take("ada")
    asking = PluginSlot(slots, "ada")
    asking.client_wait_started()
    await slots.take("bob")  # another call takes the slot given back meanwhile
    regain = asyncio.ensure_future(asking.client_wait_ended())
    queued = asyncio.ensure_future(slots.take_unless_retired("cy"))
    await asyncio.sleep(0)
    slots.retire()
    with anyio.fail_after(5):
        assert await queued is False  # it holds none of them
    assert not regain.done()
    slots.give()  # bob's call ends
    with anyio.fail_after(5):
        await regain
    assert locked(slots)  # the asking call holds it again
    asking.close()
    assert await free_slots(slots) == 1


async def test_calls_queued_for_a_plugin_slot_do_not_wait_out_the_audit_window(
    make_runtime: Any, tmp_path: Path, bridge: Any
) -> None:
    # While an audit batch gathers, the plugins' answers are read as it commits. A call
    # queued for the slot a held answer would free has them read at once: they waited out a
    # window each, one call per window.
    kit = tmp_path / "kit-1"
    shutil.copytree(KIT_DIR, kit)
    manifest = orjson.loads((kit / "plugin.json").read_bytes())
    manifest["quotas"]["max_concurrency"] = 1
    (kit / "plugin.json").write_bytes(orjson.dumps(manifest))
    runtime: Runtime = make_runtime(audit_window_ms=1000)
    runtime.plugins.install(kit)
    await runtime.start()
    try:
        ada = await new_agent(runtime, "ada", "kit")
        results = await asyncio.gather(
            *(call(runtime, ada, "echo", {"text": str(i)}, str(i), bridge) for i in range(3))
        )
        assert [r["content"][0]["text"] for r in results] == ["0", "1", "2"]
        # all three ran, one after the other, within the first window: one batch
        assert runtime.audit.stats.largest_batch == 3
    finally:
        await runtime.aclose()
