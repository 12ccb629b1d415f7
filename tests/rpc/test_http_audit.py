"""Every governed call over HTTP leaves exactly one audit record with its outcome, and the
caller hears back only after that record is durable."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx2
import orjson
import pytest
from rpc_live import FAULTY_DIR, NOTES_DIR, LiveServer, McpHttp, make_runtime, serve

from mcp_zero.audit.chain import verify_store

pytestmark = pytest.mark.anyio


@dataclass
class Env:
    live: LiveServer
    full: str
    bare: str
    visitor: str  # the token of the agent token-less callers act as


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    runtime = make_runtime(
        tmp_path_factory.mktemp("http-audit") / "data", anonymous_agent="visitor"
    )
    runtime.plugins.install(NOTES_DIR)
    runtime.plugins.install(FAULTY_DIR)
    full = await runtime.agents.spawn("auditee", ["notes", "faulty"])
    bare = await runtime.agents.spawn("outsider", [])
    visitor = await runtime.agents.spawn("visitor", ["faulty"])
    async with serve(runtime) as live:
        yield Env(live, full.token, bare.token, visitor.token)


def records_for(live: LiveServer, request_id: str) -> list[dict[str, Any]]:
    """The audit records of the tools/call with this JSON-RPC id, read straight from the store."""
    out = []
    for entry in live.runtime.store.read_audit(0, 100_000):
        body = orjson.loads(entry.body)
        if body.get("verb") == "call_tool" and body.get("request_id") == request_id:
            out.append(body)
    return out


async def call_with_id(client: McpHttp, request_id: str, tool: str, args: dict[str, Any]) -> Any:
    response = await client.post(
        {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "tools/call",
            "params": {"name": tool, "arguments": args},
        }
    )
    reply = response.json()
    assert reply["id"] == request_id
    # Read the store before anything else can run: the record must already be there.
    return reply, records_for(client.live, request_id)


async def test_every_outcome_is_audited_once_before_the_answer(env: Env) -> None:
    live = env.live
    full, bare, anon = live.client(env.full), live.client(env.bare), live.client(None)
    # (client, id, tool, arguments, expected agent, outcome, code)
    cases: list[tuple[McpHttp, str, str, dict[str, Any], str, str, str | None]] = [
        (full, "a-allowed", "faulty_echo", {"text": "hi"}, "auditee", "allowed", None),
        (full, "a-note", "notes_add", {"text": "audited note"}, "auditee", "allowed", None),
        (bare, "a-denied", "faulty_echo", {"text": "hi"}, "outsider", "denied", "policy_denied"),
        (full, "a-schema", "notes_add", {"text": 3}, "auditee", "error", "invalid_params"),
        (full, "a-unknown", "nope", {}, "auditee", "error", "tool_not_found"),
        (full, "a-crash", "faulty_crash", {}, "auditee", "error", "plugin_crashed"),
        (full, "a-timeout", "faulty_hang", {}, "auditee", "timeout", "tool_timeout"),
        (full, "a-toolerr", "faulty_raise", {}, "auditee", "allowed", None),
        (anon, "a-anon", "faulty_echo", {"text": "anon"}, "visitor", "allowed", None),
    ]
    for client, rid, tool, args, agent, outcome, code in cases:
        reply, records = await call_with_id(client, rid, tool, args)
        assert len(records) == 1, (rid, reply, records)
        record = records[0]
        assert record["agent"] == agent, rid
        assert record["outcome"] == outcome, (rid, record)
        assert record.get("code") == code, (rid, record)
        assert record["resource"] == tool
        assert record["transport"] == "http"
        assert record["anonymous"] is (client is anon)
        # (arguments failing the schema: a tool execution error in 2025-11-25, SEP-1303)
        assert ("error" in reply) is (code not in (None, "invalid_params")), (rid, reply)
    denied = records_for(live, "a-denied")[0]
    assert denied["policies"] == ["attached-plugins-only"]
    assert denied["reasons"]
    assert records_for(live, "a-toolerr")[0]["tool_error"] is True
    # arguments are kept as a digest, never in clear
    assert "audited note" not in orjson.dumps(records_for(live, "a-note")[0]).decode()
    report = verify_store(live.runtime.store)
    assert report.count == len(live.runtime.store.read_audit(0, 100_000))


async def test_the_head_at_answer_time_already_holds_the_call(env: Env) -> None:
    store = env.live.runtime.store
    client = env.live.client(env.full)
    for n in range(5):
        before = store.audit_head()
        reply, records = await call_with_id(client, f"head-{n}", "faulty_echo", {"text": str(n)})
        head = store.audit_head()
        assert "result" in reply
        assert head is not None
        assert before is None or head.seq > before.seq
        assert orjson.loads(head.body)["request_id"] == f"head-{n}"
        assert len(records) == 1


async def test_a_call_without_token_is_marked_anonymous(env: Env) -> None:
    reply, records = await call_with_id(
        env.live.client(None), "anon-2", "faulty_echo", {"text": "who"}
    )
    assert reply["result"]["content"][0]["text"] == "who"
    assert records == [records[0]]
    assert records[0]["anonymous"] is True
    assert records[0]["agent"] == "visitor"
    # a token still wins over the anonymous agent, and is not anonymous
    _, named = await call_with_id(
        env.live.client(env.full), "named-2", "faulty_echo", {"text": "me"}
    )
    assert named[0]["anonymous"] is False
    assert named[0]["agent"] == "auditee"


async def test_anonymity_is_kept_after_the_admin_executes_as_the_same_agent(env: Env) -> None:
    live = env.live
    async with httpx2.AsyncClient(verify=False, timeout=20) as http:
        executed = await http.post(
            f"{live.base}/api/v1/agents/visitor/execute",
            json={"tool": "faulty_echo", "arguments": {"text": "by admin"}},
            headers={"Authorization": f"Bearer {live.runtime.admin_token()}"},
        )
    assert executed.status_code == 200
    _, records = await call_with_id(live.client(None), "anon-3", "faulty_echo", {"text": "anon"})
    assert records[0]["anonymous"] is True
    by_admin = [
        orjson.loads(e.body)
        for e in live.runtime.store.read_audit(0, 100_000)
        if b'"transport":"admin"' in e.body
    ]
    assert by_admin[-1]["agent"] == "visitor"
    assert by_admin[-1]["anonymous"] is False


async def test_token_less_callers_and_the_agents_token_holder_do_not_share_sessions(
    env: Env,
) -> None:
    holder = env.live.client(env.visitor)
    await holder.initialize()
    stranger = env.live.client(None)  # token-less: acts as "visitor" too, but anonymously
    stranger.session_id = holder.session_id
    response = await stranger.post({"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert response.status_code == 404
    async with httpx2.AsyncClient(verify=False, timeout=20) as http:
        deleted = await http.delete(env.live.url, headers=stranger.headers())
    assert deleted.status_code == 404
    assert "result" in await holder.request("ping")  # still the holder's


async def test_a_subscription_is_audited_allowed_denied_or_unknown(env: Env) -> None:
    live = env.live
    full, bare = live.client(env.full), live.client(env.bare)
    await full.initialize()
    await bare.initialize()
    cases = [  # (client, id, uri, agent, outcome, code)
        (full, "s-allowed", "faulty://counter", "auditee", "allowed", None),
        (bare, "s-denied", "faulty://counter", "outsider", "denied", "policy_denied"),
        (full, "s-unknown", "faulty://nothing", "auditee", "error", "resource_not_found"),
    ]
    for client, rid, uri, agent, outcome, code in cases:
        response = await client.post(
            {"jsonrpc": "2.0", "id": rid, "method": "resources/subscribe", "params": {"uri": uri}}
        )
        reply = response.json()
        # read at once: the record is durable before the answer
        records = [
            r
            for r in (orjson.loads(e.body) for e in live.runtime.store.read_audit(0, 100_000))
            if r.get("request_id") == rid
        ]
        # (arguments failing the schema: a tool execution error in 2025-11-25, SEP-1303)
        assert ("error" in reply) is (code not in (None, "invalid_params")), (rid, reply)
        assert len(records) == 1, (rid, records)
        record = records[0]
        assert record["verb"] == "read_resource"
        assert record["method"] == "resources/subscribe"
        assert (record["agent"], record["resource"]) == (agent, uri)
        assert (record["outcome"], record.get("code")) == (outcome, code), rid
        assert record["transport"] == "http"
        assert record["anonymous"] is False
        if outcome == "denied":
            assert record["policies"] == ["attached-plugins-content"]
            assert record["reasons"] == reply["error"]["data"]["reasons"]
        if outcome == "allowed":
            assert record["plugin"] == "faulty"
            assert record["policies"]


async def test_requests_7100_and_quoted_7100_each_have_a_record_with_their_own_id(
    env: Env,
) -> None:
    """A record holds the request's id as the JSON value the client sent, an integer or a
    string: held as a string, the records of requests 1 and "1" read the same, and the log
    could not say which request one answers (found by review). Each governed request,
    whatever its outcome."""
    live = env.live
    full, bare = live.client(env.full), live.client(env.bare)
    await full.initialize()
    echo = {"name": "faulty_echo", "arguments": {"text": "x"}}
    unknown_prompt = {"type": "ref/prompt", "name": "none"}
    # (client, method, params, outcome)
    requests: list[tuple[McpHttp, str, dict[str, Any], str]] = [
        (full, "tools/call", echo, "allowed"),
        (bare, "tools/call", echo, "denied"),
        (full, "tools/call", {"name": "notes_add", "arguments": {"text": 3}}, "error"),
        (full, "tools/call", {"arguments": {}}, "error"),  # (refused for its params)
        (full, "resources/read", {"uri": "faulty://counter"}, "allowed"),
        (full, "resources/subscribe", {"uri": "faulty://counter"}, "allowed"),
        (full, "prompts/get", {"name": "none"}, "error"),
        (
            full,
            "completion/complete",
            {"ref": unknown_prompt, "argument": {"name": "a", "value": "b"}},
            "error",
        ),
    ]
    for n, (client, method, params, outcome) in enumerate(requests, start=7100):
        for rid in (n, str(n)):
            message = {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}
            reply = (await client.post(message)).json()
            assert reply["id"] == rid
            records = [
                (type(r["request_id"]), r["outcome"])
                for r in (orjson.loads(e.body) for e in live.runtime.store.read_audit(0, 100_000))
                if r.get("request_id") == rid
            ]
            assert records == [(type(rid), outcome)], (method, rid)
    assert verify_store(live.runtime.store).count == len(live.runtime.store.read_audit(0, 100_000))
