"""MCP 2026-07-28 over streamable HTTP, on the wire: no handshake, every request carries its
protocol version and client capabilities in ``_meta`` (and the headers repeat it), results
say their ``resultType``, a dropped connection cancels, and ``subscriptions/listen`` replaces
the GET stream. The official client in that mode is in test_official_client_inprocess.py."""

from __future__ import annotations

import asyncio
import itertools
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import orjson
import pytest
from rpc_live import (
    CONFORMANCE_DIR,
    FAULTY_DIR,
    NOTES_DIR,
    LiveServer,
    make_runtime,
    parse_sse_text,
    serve,
)

from mcp_zero.errors import HEADER_MISMATCH, MISSING_CLIENT_CAPABILITY, UNSUPPORTED_PROTOCOL_VERSION
from mcp_zero.rpc.resume import EndedCalls
from mcp_zero.runtime import Runtime
from mcp_zero.storage.sqlite import SqliteStore

pytestmark = pytest.mark.anyio
JSON = dict[str, Any]
V = "2026-07-28"
TIMEOUT_S = 20.0
_ids = itertools.count(1)


@dataclass
class Env:
    live: LiveServer
    token: str
    reader_token: str  # an agent without the faulty plugin


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    runtime = make_runtime(tmp_path_factory.mktemp("stateless") / "data")
    runtime.plugins.install(NOTES_DIR)
    runtime.plugins.install(FAULTY_DIR)
    runtime.plugins.install(CONFORMANCE_DIR)
    agent = await runtime.agents.spawn("modern", ["notes", "faulty", "conformance"])
    reader = await runtime.agents.spawn("reader", ["notes"])
    async with serve(runtime) as live:
        yield Env(live, agent.token, reader.token)


def envelope(**extra: Any) -> JSON:
    return {
        "io.modelcontextprotocol/protocolVersion": V,
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "wire-test", "version": "0"},
        **extra,
    }


def message(method: str, params: JSON | None = None, meta: JSON | None = None) -> JSON:
    return {
        "jsonrpc": "2.0",
        "id": next(_ids),
        "method": method,
        "params": {**(params or {}), "_meta": envelope() if meta is None else meta},
    }


def headers_for(env: Env, body: JSON, token: str | None = None, **extra: str) -> dict[str, str]:
    out = {
        "Authorization": f"Bearer {token or env.token}",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "MCP-Protocol-Version": V,
        "Mcp-Method": body["method"],
    }
    named = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
    field = named.get(body["method"])
    if field is not None:
        out["Mcp-Name"] = body["params"][field]
    out.update(extra)
    return out


async def post(env: Env, body: JSON, **extra: str) -> httpx2.Response:
    async with httpx2.AsyncClient(verify=False, timeout=TIMEOUT_S) as http:
        with anyio.fail_after(TIMEOUT_S):
            return await http.post(
                env.live.url, content=orjson.dumps(body), headers=headers_for(env, body, **extra)
            )


@asynccontextmanager
async def streamed(
    env: Env, body: JSON, token: str | None = None
) -> AsyncIterator[httpx2.Response]:
    """POST ``body`` and hold its response open (an SSE stream), within the time limit."""
    async with httpx2.AsyncClient(verify=False, timeout=TIMEOUT_S) as http:
        with anyio.fail_after(TIMEOUT_S):
            async with http.stream(
                "POST",
                env.live.url,
                content=orjson.dumps(body),
                headers=headers_for(env, body, token=token),
            ) as response:
                yield response


def messages_of(response: httpx2.Response) -> list[JSON]:
    if response.headers["content-type"].startswith("text/event-stream"):
        return [e.message for e in parse_sse_text(response.text) if e.data]
    return [response.json()]


def audit_records(env: Env, request_id: Any) -> list[JSON]:
    """The audit records of one request, in their order."""
    store = env.live.runtime.store
    records = [orjson.loads(e.body) for e in store.read_audit(0, 100_000)]
    return [r for r in records if r.get("request_id") == request_id]


def audit_outcomes(env: Env, request_id: Any) -> list[tuple[str, str | None]]:
    """(outcome, code) of the audit records of one request."""
    store = env.live.runtime.store
    records = [orjson.loads(e.body) for e in store.read_audit(0, 100_000)]
    return [(r["outcome"], r.get("code")) for r in records if r.get("request_id") == request_id]


async def test_discover_says_what_the_server_speaks_without_a_session(env: Env) -> None:
    response = await post(env, message("server/discover"))
    assert response.status_code == 200, response.text
    assert "mcp-session-id" not in response.headers
    result = response.json()["result"]
    assert result["supportedVersions"][0] == V
    assert {"2025-11-25", "2025-06-18"} <= set(result["supportedVersions"])
    # Logging is declared: the server sends notifications/message when a request asks.
    assert set(result["capabilities"]) == {
        "tools",
        "resources",
        "prompts",
        "logging",
        "completions",
    }
    assert result["resultType"] == "complete"
    assert result["ttlMs"] == 0
    assert result["cacheScope"] == "private"
    assert result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "mcp-zero"


async def test_results_carry_result_type_and_lists_their_cache_hints(env: Env) -> None:
    listed = (await post(env, message("tools/list"))).json()["result"]
    assert listed["resultType"] == "complete"
    assert (listed["ttlMs"], listed["cacheScope"]) == (0, "private")
    assert "faulty_echo" in {t["name"] for t in listed["tools"]}
    called = (
        await post(env, message("tools/call", {"name": "faulty_echo", "arguments": {"text": "x"}}))
    ).json()["result"]
    assert called["resultType"] == "complete"
    assert "ttlMs" not in called  # a tool call is not cacheable
    assert called["content"] == [{"type": "text", "text": "x"}]


async def test_arguments_failing_the_schema_are_a_tool_error(env: Env) -> None:
    # as in 2025-11-25 (SEP-1303): the model sees it, and can correct its call (it was -32602)
    body = message("tools/call", {"name": "notes_add", "arguments": {"text": ""}})
    response = await post(env, body)
    assert response.status_code == 200
    result = response.json()["result"]
    assert result["content"] == [
        {"type": "text", "text": 'invalid arguments at /text: "" is shorter than 1 character'}
    ]
    assert (result["isError"], result["resultType"]) == (True, "complete")
    assert "structuredContent" not in result  # (notes_add's outputSchema has no error shape)


async def test_a_request_without_the_envelope_is_refused_with_the_missing_keys(env: Env) -> None:
    body = message("tools/list", meta={"io.modelcontextprotocol/protocolVersion": V})
    response = await post(env, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == -32602
    assert "clientCapabilities" in error["message"]


@pytest.mark.parametrize(
    ("header", "value"),
    [("MCP-Protocol-Version", "2026-07-29"), ("Mcp-Method", "tools/list"), ("Mcp-Name", "other")],
)
async def test_headers_that_disagree_with_the_body_are_refused(
    env: Env, header: str, value: str
) -> None:
    body = message("tools/call", {"name": "faulty_echo", "arguments": {"text": "x"}})
    response = await post(env, body, **{header: value})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == HEADER_MISMATCH
    assert audit_outcomes(env, body["id"]) == []  # the tool was not called


async def test_an_unknown_version_is_answered_with_the_versions_we_speak(env: Env) -> None:
    body = message(
        "tools/list", meta=envelope(**{"io.modelcontextprotocol/protocolVersion": "2099-01-01"})
    )
    response = await post(env, body, **{"MCP-Protocol-Version": "2099-01-01"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == UNSUPPORTED_PROTOCOL_VERSION
    assert error["data"]["requested"] == "2099-01-01"
    assert V in error["data"]["supported"]


async def test_methods_the_revision_removed_are_not_found(env: Env) -> None:
    removed = ("initialize", "ping", "logging/setLevel", "resources/subscribe")
    for method in (*removed, "resources/unsubscribe"):
        response = await post(env, message(method, {"level": "info", "uri": "faulty://counter"}))
        assert response.status_code == 404, (method, response.text)
        assert response.json()["error"]["code"] == -32601


async def test_whitespace_around_header_values_is_not_part_of_them(env: Env) -> None:
    body = orjson.dumps(message("tools/call", {"name": "faulty_echo", "arguments": {"text": "x"}}))
    head = (
        f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{env.live.port}\r\n"
        f"Authorization: Bearer {env.token}\r\nContent-Type: application/json\r\n"
        "Accept: application/json, text/event-stream\r\nMCP-Protocol-Version: 2026-07-28\r\n"
        "Mcp-Method:  tools/call \r\nMcp-Name: \tfaulty_echo\t\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    # (HTTP client libraries will not send such headers: a raw socket)
    with anyio.fail_after(TIMEOUT_S):
        reader, writer = await asyncio.open_connection("127.0.0.1", env.live.port)
        writer.write(head.encode() + body)
        answer = await reader.read()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]


async def test_initialize_never_negotiates_the_stateless_revision(env: Env) -> None:
    for asked, got in (
        (V, "2025-11-25"),
        ("2099-01-01", "2025-11-25"),
        ("2025-06-18", "2025-06-18"),
    ):
        body = {
            "jsonrpc": "2.0",
            "id": next(_ids),
            "method": "initialize",
            "params": {
                "protocolVersion": asked,
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "0"},
            },
        }
        async with httpx2.AsyncClient(verify=False, timeout=TIMEOUT_S) as http:
            response = await http.post(
                env.live.url,
                content=orjson.dumps(body),
                headers={
                    "Authorization": f"Bearer {env.token}",
                    "Accept": "application/json, text/event-stream",
                    "Content-Type": "application/json",
                },
            )
        assert response.json()["result"]["protocolVersion"] == got, asked


async def test_an_enveloped_request_does_not_belong_in_a_handshake_session(env: Env) -> None:
    client = env.live.client(env.token)
    await client.initialize("2025-11-25")
    reply = await client.request("tools/list", {"_meta": envelope()})
    assert reply["error"]["code"] == -32600
    assert "initialize" in reply["error"]["message"]


async def test_log_messages_only_when_the_request_asks_for_them(env: Env) -> None:
    quiet = messages_of(await post(env, message("tools/call", {"name": "faulty_log_levels"})))
    assert [m for m in quiet if m.get("method") == "notifications/message"] == []
    body = message(
        "tools/call",
        {"name": "faulty_log_levels"},
        meta=envelope(**{"io.modelcontextprotocol/logLevel": "warning"}),
    )
    loud = messages_of(await post(env, body))
    levels = [m["params"]["level"] for m in loud if m.get("method") == "notifications/message"]
    assert levels == ["warning", "error"]
    assert loud[-1]["result"]["resultType"] == "complete"


async def test_progress_then_the_result_on_the_requests_own_stream(env: Env) -> None:
    body = message(
        "tools/call",
        {"name": "faulty_progress", "arguments": {"steps": 2}},
        meta=envelope(progressToken="p1"),
    )
    response = await post(env, body)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "mcp-session-id" not in response.headers
    got = messages_of(response)
    assert [m["params"]["progress"] for m in got[:-1]] == [1, 2]
    assert got[-1]["id"] == body["id"]
    assert got[-1]["result"]["resultType"] == "complete"


async def test_closing_the_connection_cancels_the_call_and_the_audit_says_so(env: Env) -> None:
    body = message(
        "tools/call", {"name": "faulty_started_then_wait"}, meta=envelope(progressToken=1)
    )
    async with streamed(env, body) as response:
        async for line in response.aiter_lines():
            if "notifications/progress" in line:
                break  # the tool runs: hang up
    with anyio.fail_after(TIMEOUT_S):
        while audit_outcomes(env, body["id"]) != [("error", "cancelled")]:
            await asyncio.sleep(0.02)


async def test_listen_acknowledges_then_delivers_what_was_asked(env: Env) -> None:
    lister = (await env.live.runtime.agents.spawn("lister", ["faulty"])).token
    body = message(
        "subscriptions/listen",
        {
            "notifications": {
                "toolsListChanged": True,
                "resourceSubscriptions": ["faulty://counter", "notes://nowhere"],
            }
        },
    )
    async with streamed(env, body, lister) as response:
        assert response.status_code == 200
        lines = response.aiter_lines()
        ack = await _next_message(lines)
        assert ack["method"] == "notifications/subscriptions/acknowledged"
        tag = {"io.modelcontextprotocol/subscriptionId": body["id"]}
        assert ack["params"] == {
            "notifications": {
                "toolsListChanged": True,
                "resourceSubscriptions": ["faulty://counter"],  # the other is unknown
            },
            "_meta": tag,
        }
        bumped = await post(env, message("tools/call", {"name": "faulty_bump"}), token=lister)
        assert bumped.status_code == 200
        updated = await _next_message(lines)
        assert updated == {
            "jsonrpc": "2.0",
            "method": "notifications/resources/updated",
            "params": {"uri": "faulty://counter", "_meta": tag},
        }
        # the agent's tools change (its resources and prompts do not: notes has none)
        await env.live.runtime.agents.attach("lister", "notes")
        changed = await _next_message(lines)
        assert changed["method"] == "notifications/tools/list_changed"
        assert changed["params"] == {"_meta": tag}


async def test_listen_refuses_resources_the_agent_may_not_read(env: Env) -> None:
    body = message(
        "subscriptions/listen", {"notifications": {"resourceSubscriptions": ["faulty://counter"]}}
    )
    async with streamed(env, body, env.reader_token) as response:
        ack = await _next_message(response.aiter_lines())
        # and the refusal is audited, with the policy's reasons, before the acknowledgement
        [record] = audit_records(env, body["id"])
    assert ack["params"]["notifications"] == {"resourceSubscriptions": []}
    assert record["verb"] == "read_resource"
    assert record["method"] == "subscriptions/listen"
    assert (record["agent"], record["resource"], record["plugin"]) == (
        "reader",
        "faulty://counter",
        "faulty",
    )
    assert (record["outcome"], record["code"]) == ("denied", "policy_denied")
    assert record["policies"] == ["attached-plugins-content"]
    assert record["reasons"]


async def test_each_resource_a_listen_names_is_audited(env: Env) -> None:
    watched = ["faulty://counter", "notes://nowhere", "faulty://counter"]  # (a repeat)
    body = message("subscriptions/listen", {"notifications": {"resourceSubscriptions": watched}})
    async with streamed(env, body) as response:
        ack = await _next_message(response.aiter_lines())
        records = audit_records(env, body["id"])
    assert ack["params"]["notifications"] == {"resourceSubscriptions": ["faulty://counter"]}
    assert [(r["resource"], r["outcome"], r.get("code")) for r in records] == [
        ("faulty://counter", "allowed", None),
        ("notes://nowhere", "error", "resource_not_found"),
    ]
    assert records[0]["policies"]


async def test_a_listen_names_a_bounded_number_of_resources(env: Env) -> None:
    many = [f"notes://n{i}" for i in range(1001)]
    body = message("subscriptions/listen", {"notifications": {"resourceSubscriptions": many}})
    response = await post(env, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == -32602
    assert "at most 1000" in error["message"]
    assert audit_records(env, body["id"]) == []


async def test_a_bad_listen_filter_is_invalid_params(env: Env) -> None:
    response = await post(env, message("subscriptions/listen", {"notifications": ["tools"]}))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == -32602


async def test_get_and_delete_have_no_sessions_to_serve(env: Env) -> None:
    async with httpx2.AsyncClient(verify=False, timeout=TIMEOUT_S) as http:
        for verb in ("GET", "DELETE"):
            response = await http.request(
                verb,
                env.live.url,
                headers={
                    "Authorization": f"Bearer {env.token}",
                    "Accept": "text/event-stream",
                    "MCP-Protocol-Version": V,
                },
            )
            assert response.status_code == 405, verb
            assert response.headers["allow"] == "POST"


async def notes_agent(tmp_path: Any, name: str, **settings: Any) -> tuple[Runtime, str]:
    """A runtime on a fresh data dir (``settings``) with the notes plugin, and the token of
    agent ``name``, to whom it is attached."""
    runtime = make_runtime(tmp_path / "data", **settings)
    runtime.plugins.install(NOTES_DIR)
    return runtime, (await runtime.agents.spawn(name, ["notes"])).token


def listen_to_tools() -> JSON:
    """A new ``subscriptions/listen`` request for the tools list's changes."""
    return message("subscriptions/listen", {"notifications": {"toolsListChanged": True}})


@pytest.mark.parametrize("ending", ["the server stops", "its token is rotated"])
async def test_a_listen_stream_ends_with_its_result_when(tmp_path: Any, ending: str) -> None:
    # Rotated, it went on hearing the agent's notices until its client closed it: a rotation
    # for a leaked token left the leak listening (found by review)
    runtime, token = await notes_agent(tmp_path, "listener")
    async with serve(runtime) as live:
        body = listen_to_tools()
        async with streamed(Env(live, token, token), body) as response:
            lines = response.aiter_lines()
            await _next_message(lines)  # the acknowledgement
            if ending == "the server stops":
                live.server.stop()
            else:
                owner = Env(live, (await runtime.agents.rotate_token("listener")).token, "")
            with anyio.fail_after(TIMEOUT_S):
                last = await _next_message(lines)  # at once
            if ending == "its token is rotated":
                async with streamed(owner, listen_to_tools()) as new:  # the new token's stays
                    acknowledged = await _next_message(new.aiter_lines())
                    assert acknowledged["method"] == "notifications/subscriptions/acknowledged"
                    await live.app.list_changes.check()  # (what the once-a-second check sees)
                    streams = live.app.server.listeners.values()
                    assert [listener.mailbox.ended for listener in streams] == [False]
    assert last["id"] == body["id"]
    assert last["result"]["resultType"] == "complete"
    assert last["result"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == body["id"]


async def test_a_listen_past_the_agents_limit_ends_its_oldest_stream(tmp_path: Any) -> None:
    # Refused instead, with -32005: streams kept open by one client (a leaked token's) locked
    # the agent's other clients out of listen streams for as long as they stayed open (found
    # by review)
    runtime, token = await notes_agent(tmp_path, "busy", max_sessions_per_agent=2)
    async with serve(runtime) as live:
        client = Env(live, token, token)
        first, second = listen_to_tools(), listen_to_tools()
        async with streamed(client, first) as oldest, streamed(client, second) as older:
            oldest_lines, older_lines = oldest.aiter_lines(), older.aiter_lines()
            for lines in (oldest_lines, older_lines):
                await _next_message(lines)  # the acknowledgement
            async with streamed(client, listen_to_tools()) as newest:
                newest_lines = newest.aiter_lines()
                acknowledged = await _next_message(newest_lines)
                assert acknowledged["method"] == "notifications/subscriptions/acknowledged"
                # the oldest ends with its result, as when the server stops; the other stays
                ended = await _next_message(oldest_lines)
                assert ended["id"] == first["id"]
                assert ended["result"]["resultType"] == "complete"
                assert len(live.app.server.listeners) == 2
                assert [lis.mailbox.ended for lis in live.app.server.listeners.values()] == [
                    False,
                    False,
                ]


async def test_token_less_listens_neither_push_out_nor_are_pushed_out_by_token_holders(
    tmp_path: Any,
) -> None:
    runtime, token = await notes_agent(
        tmp_path, "shared", anonymous_agent="shared", max_sessions_per_agent=1
    )
    async with serve(runtime) as live:
        holder = Env(live, token, token)
        async with streamed(holder, listen_to_tools()) as held, httpx2.AsyncClient() as http:
            held_lines = held.aiter_lines()  # (held: a generator dropped closes the stream)
            await _next_message(held_lines)
            body = listen_to_tools()
            headers = headers_for(holder, body)
            del headers["Authorization"]
            with anyio.fail_after(TIMEOUT_S):
                async with http.stream(
                    "POST", live.url, content=orjson.dumps(body), headers=headers
                ) as token_less:
                    token_less_lines = token_less.aiter_lines()
                    acknowledged = await _next_message(token_less_lines)
                    assert acknowledged["method"] == "notifications/subscriptions/acknowledged"
                    streams = live.app.server.listeners.values()
                    assert [lis.principal.anonymous for lis in streams] == [False, True]
                    assert not any(lis.mailbox.ended for lis in streams)


# -- input_required: a tool that asks the client, across requests ---------------------------------

ELICITING = {"elicitation": {}}
ASK = {"name": "test_elicitation", "arguments": {"message": "who are you?"}}


async def test_a_question_comes_back_as_input_required_and_the_retry_gets_the_result(
    env: Env,
) -> None:
    body = message("tools/call", ASK, meta=envelope(**capable()))
    asked = (await post(env, body)).json()["result"]
    assert asked["resultType"] == "input_required", asked
    [(key, question)] = asked["inputRequests"].items()
    assert question["method"] == "elicitation/create"
    assert question["params"]["message"] == "who are you?"
    answer = {"action": "accept", "content": {"username": "ada", "email": "ada@example.org"}}
    retry = message(
        "tools/call",
        {**ASK, "inputResponses": {key: answer}, "requestState": asked["requestState"]},
        meta=envelope(**capable()),
    )
    done = (await post(env, retry)).json()["result"]
    assert done["resultType"] == "complete"
    assert "action=accept" in done["content"][0]["text"]
    # audited once, under the first request's id, and the question as an action of its own
    assert audit_outcomes(env, body["id"]) == [("allowed", None), ("allowed", None)]


async def test_a_call_waiting_for_its_retry_when_the_server_stops_records_its_end(
    tmp_path: Path,
) -> None:
    # It runs in no request the server waits for as it stops: cancelled there, its records
    # (its own, and its question's) must go in before the audit log closes (found by a bug
    # hunt on stdio, where they were lost)
    runtime = make_runtime(tmp_path / "data")
    runtime.plugins.install(CONFORMANCE_DIR)
    agent = await runtime.agents.spawn("asker", ["conformance"])
    body = message("tools/call", ASK, meta=envelope(**capable()))
    async with serve(runtime) as live:
        env = Env(live, agent.token, agent.token)
        asked = (await post(env, body)).json()["result"]
        assert asked["resultType"] == "input_required", asked
    with SqliteStore(runtime.settings.db_path) as store:
        records = [orjson.loads(e.body) for e in store.read_audit(0, 100_000)]
    ended = [
        (r["verb"], r["outcome"], r.get("code"))
        for r in records
        if r.get("request_id") == body["id"]
    ]
    assert sorted(ended) == [
        ("call_tool", "error", "cancelled"),
        ("client_request", "error", "cancelled"),
    ], ended


async def test_a_question_carrying_a_secret_is_not_asked_when_a_policy_forbids_it(
    env: Env,
) -> None:
    runtime = env.live.runtime
    forbid = runtime.settings.policy_dir / "no-secret-questions.cedar"
    forbid.write_text(
        '@id("no-secret-questions")\n'
        'forbid (principal, action == Action::"client_request", resource)\n'
        'when { context.labels.contains("secret") };\n'
    )
    runtime.policy.reload()
    try:
        secret = {**ASK, "arguments": {"message": "my key is AKIAIOSFODNN7EXAMPLE"}}
        body = message("tools/call", secret, meta=envelope(**capable()))
        done = (await post(env, body)).json()["result"]
    finally:
        forbid.unlink()
        runtime.policy.reload()
    # no input_required: the question was not put to the client
    assert (done["resultType"], done["isError"]) == ("complete", True)
    [asked] = [r for r in audit_records(env, body["id"]) if r["verb"] == "client_request"]
    assert (asked["outcome"], asked["labels"]) == ("denied", ["secret"])


@pytest.mark.parametrize("first_asks", [True, False])
async def test_a_retry_gets_progress_and_logs_as_it_asks_not_as_the_first_request(
    env: Env, first_asks: bool
) -> None:
    # The retry got the first request's progress token and log level: progress for a
    # request already answered, or none for its own (found by review)
    asking = {"progressToken": "first", "io.modelcontextprotocol/logLevel": "warning"}
    call = {"name": "faulty_ask_between"}
    meta = envelope(**capable(), **(asking if first_asks else {}))
    asked = messages_of(await post(env, message("tools/call", call, meta=meta)))
    notes = [m for m in asked if "method" in m]
    assert len(notes) == (2 if first_asks else 0)  # before the question: the first's
    result = asked[-1]["result"]
    key = next(iter(result["inputRequests"]))
    retry = {**call, "inputResponses": {key: {"action": "accept"}}}
    retry["requestState"] = result["requestState"]
    again = {"progressToken": "retry", "io.modelcontextprotocol/logLevel": "warning"}
    meta = envelope(**capable(), **({} if first_asks else again))
    done = messages_of(await post(env, message("tools/call", retry, meta=meta)))
    notes = [m for m in done if "method" in m]
    assert done[-1]["result"]["content"][0]["text"] == "answered accept"
    if first_asks:
        assert notes == []
    else:
        progress = [m["params"]["progressToken"] for m in notes if "progress" in m["method"]]
        logged = [m["params"]["data"] for m in notes if m["method"] == "notifications/message"]
        assert (progress, logged) == (["retry"], ["after the question"])


async def test_a_retry_must_be_the_same_request_by_the_same_agent(env: Env) -> None:
    asked = (await post(env, message("tools/call", ASK, meta=envelope(**capable())))).json()
    state = asked["result"]["requestState"]
    key = next(iter(asked["result"]["inputRequests"]))
    answer = {key: {"action": "decline"}}
    for params, token, given in (
        ({"name": "faulty_echo", "arguments": {"text": "x"}}, None, state),  # another tool
        ({**ASK, "arguments": {"message": "else"}}, None, state),  # other arguments
        (ASK, env.reader_token, state),  # another agent
        (ASK, None, "not-a-state"),  # a state never given
    ):
        body = message(
            "tools/call",
            {**params, "inputResponses": answer, "requestState": given},
            meta=envelope(**capable()),
        )
        response = await post(env, body, token=token)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["data"]["path"] == "/requestState"
        # a refused request of its agent: audited (neither was, and another agent trying
        # someone's state left no trace: found by review)
        [record] = audit_records(env, body["id"])
        assert (record["outcome"], record["code"]) == ("error", "invalid_params")
        assert record["agent"] == ("reader" if token else "modern")
    body = message(
        "tools/call",
        {**ASK, "inputResponses": answer, "requestState": state},
        meta=envelope(**capable()),
    )
    declined = (await post(env, body)).json()["result"]
    assert "action=decline" in declined["content"][0]["text"]


async def test_a_retry_with_answers_that_are_not_answers_keeps_the_call(env: Env) -> None:
    asked = (await post(env, message("tools/call", ASK, meta=envelope(**capable())))).json()
    state = asked["result"]["requestState"]
    key = next(iter(asked["result"]["inputRequests"]))
    for broken in ({key: 12345}, "yes"):
        bad = {**ASK, "inputResponses": broken, "requestState": state}
        refused = message("tools/call", bad, meta=envelope(**capable()))
        response = await post(env, refused)
        assert response.status_code == 400
        assert response.json()["error"]["data"]["path"].startswith("/inputResponses")
        assert audit_outcomes(env, refused["id"]) == [("error", "invalid_params")]
    good = {**ASK, "inputResponses": {key: {"action": "cancel"}}, "requestState": state}
    done = (await post(env, message("tools/call", good, meta=envelope(**capable())))).json()
    assert "action=cancel" in done["result"]["content"][0]["text"]


async def test_a_call_whose_client_never_answers_is_cancelled(env: Env) -> None:
    resumptions = env.live.app.server.resumptions
    before = resumptions.timeout_s
    resumptions.timeout_s = 0.2
    try:
        body = message("tools/call", ASK, meta=envelope(**capable()))
        asked = (await post(env, body)).json()["result"]
        assert asked["resultType"] == "input_required"
        with anyio.fail_after(TIMEOUT_S):
            while ("error", "cancelled") not in audit_outcomes(env, body["id"]):
                await asyncio.sleep(0.02)
        assert len(resumptions) == 0
    finally:
        resumptions.timeout_s = before


async def test_a_call_that_needs_an_undeclared_capability_says_which(env: Env) -> None:
    response = await post(env, message("tools/call", ASK))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == MISSING_CLIENT_CAPABILITY
    assert error["data"]["requiredCapabilities"] == {"elicitation": {}}


@pytest.mark.parametrize(
    ("declared", "asked"),
    [
        ({"url": {}}, True),  # a URL-only client is never sent a form (found by review)
        ({"form": {}}, False),
        ({}, False),  # no mode named: form only
        ({"form": {}, "url": {}}, False),
    ],
)
async def test_a_form_is_asked_only_of_a_client_that_declares_forms(
    env: Env, declared: JSON, asked: bool
) -> None:
    meta = envelope(**{"io.modelcontextprotocol/clientCapabilities": {"elicitation": declared}})
    response = await post(env, message("tools/call", ASK, meta=meta))
    if asked:
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == MISSING_CLIENT_CAPABILITY
        assert error["data"]["requiredCapabilities"] == {"elicitation": {"form": {}}}
    else:
        assert response.json()["result"]["resultType"] == "input_required"


async def test_an_unanswered_question_is_asked_again_and_unknown_answers_ignored(env: Env) -> None:
    ask = {"name": "test_input_required_result_multiple_inputs", "arguments": {}}
    meta = envelope(
        **{
            "io.modelcontextprotocol/clientCapabilities": {
                "elicitation": {},
                "sampling": {},
                "roots": {},
            }
        }
    )
    asked = (await post(env, message("tools/call", ask, meta=meta))).json()["result"]
    assert set(asked["inputRequests"]) == {"user_name", "greeting", "client_roots"}  # together
    name = {"action": "accept", "content": {"name": "Ada"}}
    partial = {"user_name": name, "never_asked": {"x": 1}}
    retry = {**ask, "inputResponses": partial, "requestState": asked["requestState"]}
    again = (await post(env, message("tools/call", retry, meta=meta))).json()["result"]
    assert again["resultType"] == "input_required"
    assert set(again["inputRequests"]) == {"greeting", "client_roots"}
    rest = {
        "greeting": {"role": "assistant", "content": {"type": "text", "text": "Hi"}, "model": "m"},
        "client_roots": {"roots": [{"uri": "file:///w"}]},
    }
    last = {**ask, "inputResponses": rest, "requestState": again["requestState"]}
    done = (await post(env, message("tools/call", last, meta=meta))).json()["result"]
    assert done["content"][0]["text"] == "Hi Ada (1 roots)"


async def test_answers_brought_by_the_first_request_are_used_when_asked(env: Env) -> None:
    answers = {"user_name": {"action": "accept", "content": {"name": "Alice"}}}
    params = {
        "name": "test_input_required_result_elicitation",
        "arguments": {},
        "inputResponses": answers,
    }
    result = (await post(env, message("tools/call", params, meta=envelope(**capable())))).json()
    assert result["result"]["content"][0]["text"] == "Hello, Alice!"


async def test_an_unknown_resource_is_invalid_params_in_2026(env: Env) -> None:
    response = await post(env, message("resources/read", {"uri": "faulty://nothing"}))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == -32602  # SEP-2164 (it was -32002)


async def test_questions_left_open_when_the_call_ends_are_settled_and_audited(
    env: Env,
) -> None:
    ask = {"name": "test_input_required_result_multiple_inputs", "arguments": {}}
    caps = {"elicitation": {}, "roots": {}}  # not sampling: the tool fails for want of it
    meta = envelope(**{"io.modelcontextprotocol/clientCapabilities": caps})
    body = message("tools/call", ask, meta=meta)
    first = (await post(env, body)).json()
    store = env.live.runtime.store
    with anyio.fail_after(TIMEOUT_S):
        while True:  # the call ends (the tool fails) while its client has not answered
            records = [orjson.loads(e.body) for e in store.read_audit(0, 100_000)]
            mine = [r for r in records if r.get("request_id") == body["id"]]
            asked = sorted(
                (r["resource"], r["outcome"]) for r in mine if r["verb"] == "client_request"
            )
            if len(asked) == 3 and any(r["verb"] == "call_tool" for r in mine):
                break
            await asyncio.sleep(0.02)
    # each question has its record: the refused one, and the two the call left open
    assert asked == [
        ("elicitation/create", "error"),
        ("roots/list", "error"),
        ("sampling/createMessage", "error"),
    ]
    if "result" in first:  # it was parked: the retry hears how the call ended
        retry = {**ask, "requestState": first["result"]["requestState"]}
        first = (await post(env, message("tools/call", retry, meta=meta))).json()
    assert first["error"]["code"] == MISSING_CLIENT_CAPABILITY


async def test_an_unknown_log_level_is_invalid_params(env: Env) -> None:
    for level in ("verbose", "DEBUG", "off"):
        meta = envelope(**{"io.modelcontextprotocol/logLevel": level})
        response = await post(env, message("tools/list", meta=meta))
        assert response.status_code == 400, level
        assert response.json()["error"]["code"] == -32602


async def test_deeply_nested_values_are_refused_without_a_crash(env: Env) -> None:
    nested = b"[" * 900 + b'"x"' + b"]" * 900  # (orjson writes no more than 255 deep)
    meta = orjson.dumps(envelope())
    for method, params, header in (
        ("tools/call", b'{"name": ' + nested, {"Mcp-Name": "other"}),
        ("tools/list", b'{"cursor": ' + nested, {}),
    ):
        raw = (
            b'{"jsonrpc": "2.0", "id": 1, "method": "'
            + method.encode()
            + b'", "params": '
            + params
            + b', "_meta": '
            + meta
            + b"}}"
        )
        shape = {"method": method, "params": {"name": "x"}}
        async with httpx2.AsyncClient(verify=False, timeout=TIMEOUT_S) as http:
            response = await http.post(
                env.live.url, content=raw, headers=headers_for(env, shape, **header)
            )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] in (HEADER_MISMATCH, -32602)
        assert "list" in response.json()["error"]["message"]  # named by type, not printed


async def test_a_terminated_agents_listen_stream_ends(env: Env) -> None:
    doomed = (await env.live.runtime.agents.spawn("doomed", ["faulty"])).token
    watch = {"notifications": {"resourceSubscriptions": ["faulty://counter"]}}
    body = message("subscriptions/listen", watch)
    async with streamed(env, body, doomed) as response:
        lines = response.aiter_lines()
        await _next_message(lines)  # the acknowledgement
        await env.live.runtime.agents.terminate("doomed")
        ended = await _next_message(lines)  # at once: the termination is in this process
    assert ended["id"] == body["id"]
    assert ended["error"]["code"] == -32001  # as a terminated agent's session calls end


async def test_a_listener_behind_holds_one_update_per_resource_however_many_come(
    env: Env,
) -> None:
    watcher = (await env.live.runtime.agents.spawn("watcher", ["faulty"])).token
    watch = {
        "notifications": {"toolsListChanged": True, "resourceSubscriptions": ["faulty://counter"]}
    }
    body = message("subscriptions/listen", watch)
    server = env.live.app.server
    async with streamed(env, body, watcher) as response:
        lines = response.aiter_lines()
        await _next_message(lines)  # the acknowledgement
        (listener,) = [lis for (_, rid), lis in server.listeners.items() if rid == body["id"]]
        for _ in range(1_000):  # within one turn of the loop: the stream sends none meanwhile
            await server.announce_resource_updated("faulty://counter")
        assert listener.mailbox.qsize() == 1  # not 1,000: the client need hear it once
        updated = await _next_message(lines)
        assert updated["method"] == "notifications/resources/updated"
        assert updated["params"]["uri"] == "faulty://counter"
        # what comes next is the tools list's change, not the same update again
        await env.live.runtime.agents.attach("watcher", "notes")
        changed = await _next_message(lines)
        assert changed["method"] == "notifications/tools/list_changed"


def capable() -> JSON:
    return {"io.modelcontextprotocol/clientCapabilities": ELICITING}


async def _next_message(lines: AsyncIterator[str]) -> JSON:
    async for line in lines:
        if line.startswith("data: ") and line[6:].strip():
            value: JSON = orjson.loads(line[6:])
            return value
    raise AssertionError("the stream ended")


# -- parked calls and the plugin's concurrency -----------------------------------------------------


@pytest.fixture(scope="module")
async def narrow(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    """A server whose conformance plugin runs 2 calls at once (max_concurrency), for an agent
    that asks questions and one that does not."""
    root = tmp_path_factory.mktemp("narrow")
    plugin = root / "conformance"
    shutil.copytree(CONFORMANCE_DIR, plugin, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = orjson.loads((plugin / "plugin.json").read_bytes())
    manifest["quotas"]["max_concurrency"] = 2
    (plugin / "plugin.json").write_bytes(orjson.dumps(manifest))
    runtime = make_runtime(root / "data")
    runtime.plugins.install(plugin)
    asker = await runtime.agents.spawn("asker", ["conformance"])
    other = await runtime.agents.spawn("other", ["conformance"])
    async with serve(runtime) as live:
        yield Env(live, asker.token, other.token)


async def test_calls_parked_on_their_client_leave_the_plugin_to_other_agents(narrow: Env) -> None:
    parked = []
    for _ in range(2):  # as many as the plugin runs at once
        body = message("tools/call", ASK, meta=envelope(**capable()))
        asked = (await post(narrow, body)).json()["result"]
        assert asked["resultType"] == "input_required", asked
        parked.append(asked)
    simple = message("tools/call", {"name": "test_simple_text", "arguments": {}})
    with anyio.fail_after(5):  # (the parked calls would hold the slots for 30 s)
        response = await post(narrow, simple, token=narrow.reader_token)
    assert response.json()["result"]["content"][0]["text"], response.text
    # and the parked calls take a slot again when their answers come, one by one
    for asked in parked:
        key = next(iter(asked["inputRequests"]))
        answer = {key: {"action": "accept", "content": {"username": "ada"}}}
        retry = {**ASK, "inputResponses": answer, "requestState": asked["requestState"]}
        done = await post(narrow, message("tools/call", retry, meta=envelope(**capable())))
        assert "action=accept" in done.json()["result"]["content"][0]["text"]


# -- answers of calls that ended while they waited for their client -------------------------------


@pytest.fixture(scope="module")
async def keeping(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    """A server with two agents of the faulty plugin, whose calls end while they wait."""
    runtime = make_runtime(tmp_path_factory.mktemp("keeping") / "data")
    runtime.plugins.install(FAULTY_DIR)
    first = await runtime.agents.spawn("first", ["faulty"])
    second = await runtime.agents.spawn("second", ["faulty"])
    async with serve(runtime) as live:
        yield Env(live, first.token, second.token)


async def ended_call(env: Env, token: str, size: int) -> tuple[JSON, str]:
    """A call that asks its client, is not answered and ends with ``size`` bytes of text while
    its answer waits for the retry: its params and its requestState."""
    params = {"name": "faulty_ask_then_answer", "arguments": {"size": size, "patience": 0.2}}
    body = message("tools/call", params, meta=envelope(**capable()))
    asked = (await post(env, body, token=token)).json()["result"]
    assert asked["resultType"] == "input_required", asked
    state: str = asked["requestState"]
    ended = env.live.app.server.resumptions.ended
    with anyio.fail_after(TIMEOUT_S):
        while state not in ended:  # it is kept once it has ended (and never dropped at once)
            await asyncio.sleep(0.01)
    return params, state


async def retry_ended(env: Env, token: str, params: JSON, state: str) -> httpx2.Response:
    retry = {**params, "inputResponses": {}, "requestState": state}
    body = message("tools/call", retry, meta=envelope(**capable()))
    response = await post(env, body, token=token)
    if response.status_code != 200:  # a refused request of its agent, audited as such
        assert audit_outcomes(env, body["id"]) == [("error", "answer_not_kept")]
    return response


@pytest.mark.parametrize(
    ("bounds", "size"),
    [
        ({"limit": 3, "agent_limit": 2}, 10),
        ({"limit_bytes": 350_000, "agent_bytes": 220_000}, 100_000),
    ],
)
async def test_answers_kept_for_retries_are_bounded_for_each_agent_and_in_all(
    keeping: Env, bounds: JSON, size: int
) -> None:
    # A client that never retried made the server keep its every answer for a minute: 1 GB
    # in 16 s of 1 MiB answers (found by review).
    resumptions = keeping.live.app.server.resumptions
    before, resumptions.ended = resumptions.ended, EndedCalls(**bounds)
    try:
        first, second = keeping.token, keeping.reader_token
        tokens = [first, first, first, second, second]
        calls = [await ended_call(keeping, token, size) for token in tokens]
        # the first agent's oldest went past its share, its next past the bound of all
        kept = [state in resumptions.ended for _, state in calls]
        assert kept == [False, False, True, True, True]
        ended = resumptions.ended
        assert len(ended) <= ended.limit
        assert ended.held <= ended.limit_bytes
        for token, (params, state) in zip(tokens[:2], calls[:2], strict=True):
            refused = await retry_ended(keeping, token, params, state)
            assert refused.status_code == 400
            error = refused.json()["error"]
            assert error["data"] == {"code": "answer_not_kept", "path": "/requestState"}
            assert "the call ran" in error["message"]
        for token, (params, state) in zip(tokens[2:], calls[2:], strict=True):
            answered = await retry_ended(keeping, token, params, state)
            assert answered.json()["result"]["content"][0]["text"] == "x" * size
        assert (len(ended), ended.held) == (0, 0)  # each answer went with its retry
    finally:
        resumptions.ended.close()
        resumptions.ended = before


async def test_a_retry_after_its_answer_expired_hears_that_the_call_ran(keeping: Env) -> None:
    resumptions = keeping.live.app.server.resumptions
    before, resumptions.ended = resumptions.ended, EndedCalls(keep_s=0.3)
    try:
        params, state = await ended_call(keeping, keeping.token, 10)
        with anyio.fail_after(TIMEOUT_S):
            while state in resumptions.ended:
                await asyncio.sleep(0.01)
        refused = await retry_ended(keeping, keeping.token, params, state)
        assert refused.json()["error"]["data"]["code"] == "answer_not_kept"
        # another agent learns nothing of it: the state is unknown to it
        stranger = message(
            "tools/call",
            {**params, "inputResponses": {}, "requestState": state},
            meta=envelope(**capable()),
        )
        unknown = (await post(keeping, stranger, token=keeping.reader_token)).json()
        assert unknown["error"]["data"]["code"] == "invalid_params"
        assert "unknown or expired" in unknown["error"]["message"]
    finally:
        resumptions.ended.close()
        resumptions.ended = before


# -- Mcp-Param-* headers: the arguments a schema marks with x-mcp-header ---------------------------


@pytest.fixture(scope="module")
async def marked(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    """A server whose faulty_echo marks its text argument with "x-mcp-header": "Text"."""
    root = tmp_path_factory.mktemp("marked")
    plugin = root / "faulty"
    shutil.copytree(FAULTY_DIR, plugin, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = orjson.loads((plugin / "plugin.json").read_bytes())
    echo = next(t for t in manifest["tools"] if t["name"] == "faulty_echo")
    echo["inputSchema"]["properties"]["text"]["x-mcp-header"] = "Text"
    (plugin / "plugin.json").write_bytes(orjson.dumps(manifest))
    runtime = make_runtime(root / "data")
    runtime.plugins.install(plugin)
    agent = await runtime.agents.spawn("marked", ["faulty"])
    async with serve(runtime) as live:
        yield Env(live, agent.token, agent.token)


@pytest.mark.parametrize(
    ("text", "headers", "answered"),
    [
        ("eu-west", {"Mcp-Param-Text": "eu-west"}, True),
        ("ünïcode", {"Mcp-Param-Text": "=?base64?w7xuw69jb2Rl?="}, True),
        ("eu-west", {}, False),  # the header is missing
        ("eu-west", {"Mcp-Param-Text": "us-east"}, False),  # it says something else
        ("eu-west", {"Mcp-Param-Text": "=?base64?not base64?="}, False),
    ],
)
async def test_marked_arguments_must_match_their_headers(
    marked: Env, text: str, headers: dict[str, str], answered: bool
) -> None:
    body = message("tools/call", {"name": "faulty_echo", "arguments": {"text": text}})
    response = await post(marked, body, **headers)
    if answered:
        assert response.status_code == 200, response.text
        assert response.json()["result"]["content"][0]["text"] == text
    else:
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == HEADER_MISMATCH
        assert "Mcp-Param-Text" in response.json()["error"]["message"]
        assert audit_outcomes(marked, body["id"]) == []  # refused before anything ran


async def test_a_routing_header_sent_twice_is_refused(marked: Env) -> None:
    body = message("tools/call", {"name": "faulty_echo", "arguments": {"text": "a"}})
    headers = headers_for(marked, body)
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    raw += [(b"mcp-param-text", b"a"), (b"mcp-param-text", b"b")]
    async with httpx2.AsyncClient(verify=False, timeout=TIMEOUT_S) as http:
        response = await http.post(marked.live.url, content=orjson.dumps(body), headers=raw)
    assert response.status_code == 400
    assert "once" in response.json()["error"]["message"]


async def test_terminating_an_agent_stops_its_running_and_waiting_calls(env: Env) -> None:
    token = (await env.live.runtime.agents.spawn("ending", ["faulty", "conformance"])).token
    nap = message("tools/call", {"name": "faulty_nap", "arguments": {"seconds": 5}})
    asked = (
        await post(env, message("tools/call", ASK, meta=envelope(**capable())), token=token)
    ).json()
    state = asked["result"]["requestState"]

    async def terminate_soon() -> None:
        await asyncio.sleep(0.5)  # while the nap runs
        await env.live.runtime.agents.terminate("ending")

    with anyio.fail_after(4):  # well before the 5 s nap would end
        async with anyio.create_task_group() as group:
            group.start_soon(terminate_soon)
            stopped = (await post(env, nap, token=token)).json()
    assert stopped["error"]["code"] == -32001
    assert "terminated" in stopped["error"]["message"]
    with anyio.fail_after(TIMEOUT_S):
        while audit_outcomes(env, nap["id"]) != [("error", "cancelled")]:
            await asyncio.sleep(0.02)
    # the call that waited for its client's answer is gone too
    waiting = env.live.app.server.resumptions.principals()
    assert all(p.agent != "ending" for p in waiting)
    retry = {**ASK, "inputResponses": {}, "requestState": state}
    refused = await post(env, message("tools/call", retry, meta=envelope(**capable())), token=token)
    assert refused.status_code == 401  # the token no longer works
