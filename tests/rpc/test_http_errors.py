"""What a client sees when something is wrong, over streamable HTTP against a real server:
bad JSON-RPC, bad arguments, bad tokens, oversized bodies, policy denials, crashing and
hanging plugins, bad protocol headers and sessions, and DNS-rebinding attempts."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx2
import orjson
import pytest
from rpc_live import (
    FAULTY_DIR,
    NOTES_DIR,
    LiveServer,
    error_of,
    make_runtime,
    serve,
    served_agent,
    text_of,
)

from mcp_zero.errors import UNSUPPORTED_PROTOCOL_VERSION

pytestmark = pytest.mark.anyio


@dataclass
class Env:
    live: LiveServer
    full: str  # token of an agent with notes and faulty attached
    bare: str  # token of an agent with no plugin


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    runtime = make_runtime(tmp_path_factory.mktemp("http-errors") / "data")
    runtime.plugins.install(NOTES_DIR)
    runtime.plugins.install(FAULTY_DIR)
    full = await runtime.agents.spawn("full", ["notes", "faulty"])
    bare = await runtime.agents.spawn("bare", [])
    async with serve(runtime) as live:
        yield Env(live, full.token, bare.token)


# -- JSON-RPC envelope -------------------------------------------------------------------------


async def test_malformed_json_is_http_400_with_parse_error(env: Env) -> None:
    response = await env.live.client(env.full).post_raw(b'{"jsonrpc": "2.0", "id": 1, "meth')
    assert response.status_code == 400
    body = response.json()
    assert body["error"]["code"] == -32700
    assert body["id"] is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"id": 1, "method": "ping"}',
        b'[{"jsonrpc": "2.0", "id": 1, "method": "ping"}]',
        b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": [1, 2]}',
        b'{"jsonrpc": "2.0", "id": 1, "method": 42}',
        b'"just a string"',
        b'{"jsonrpc": "2.0", "id": null, "method": "ping"}',
        b'{"jsonrpc": "2.0", "id": 1.5, "method": "ping"}',
    ],
    ids=[
        "no-jsonrpc",
        "batch",
        "params-array",
        "method-not-string",
        "not-an-object",
        "null-id",
        "fractional-id",
    ],
)
async def test_invalid_request_is_32600(env: Env, body: bytes) -> None:
    response = await env.live.client(env.full).post_raw(body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == -32600


async def test_invalid_request_keeps_the_id_when_readable(env: Env) -> None:
    response = await env.live.client(env.full).post_raw(
        b'{"jsonrpc": "2.0", "id": "abc", "method": "tools/list", "params": 3}'
    )
    assert response.json()["id"] == "abc"


@pytest.mark.parametrize(
    ("raw_id", "shown"),
    [(b"18446744073709551616", "1.8446744073709552e+19"), (b"1.5", "1.5"), (b"1e3", "1000.0")],
)
async def test_an_id_that_is_not_a_64_bit_integer_says_so(
    env: Env, raw_id: bytes, shown: str
) -> None:
    body = b'{"jsonrpc": "2.0", "id": ' + raw_id + b', "method": "ping"}'
    response = await env.live.client(env.full).post_raw(body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == -32600
    assert error["message"] == (
        f'"id" must be a string or an integer of at most 64 bits, not {shown}'
    )


async def test_unknown_method_is_32601(env: Env) -> None:
    reply = await env.live.client(env.full).request("tools/frobnicate", {})
    assert error_of(reply)["code"] == -32601
    assert "tools/frobnicate" in error_of(reply)["message"]


# -- tool arguments and names ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "path"),
    [
        ({"text": 5}, "/text"),
        ({"text": "ok", "tags": ["not a tag!"]}, "/tags/0"),
        ({"text": "ok", "tags": ["fine", "also fine", "x"]}, "/tags/1"),
        ({}, "/"),
    ],
)
async def test_arguments_failing_the_schema_are_32602_naming_the_path_in_mcp_2025_06_18(
    env: Env, arguments: dict[str, object], path: str
) -> None:
    client = env.live.client(env.full)
    await client.initialize("2025-06-18")
    reply = await client.call("notes_add", arguments)
    error = error_of(reply)
    assert error["code"] == -32602
    assert error["data"]["path"] == path
    assert error["data"]["code"] == "invalid_params"


async def test_a_request_without_a_session_is_answered_under_the_version_it_declares(
    env: Env,
) -> None:
    # A POST without Mcp-Session-Id ran as MCP 2025-11-25 whatever its MCP-Protocol-Version
    # said: a 2025-06-18 client's schema failure came as a tool error (found by review)
    client = env.live.client(env.full)
    reply = await client.request(
        "tools/call",
        {"name": "notes_add", "arguments": {"text": 5}},
        **{"MCP-Protocol-Version": "2025-06-18"},
    )
    assert (error_of(reply)["code"], error_of(reply)["data"]["path"]) == (-32602, "/text")


@pytest.mark.parametrize("version", ["2025-11-25", None], ids=["session", "no-session"])
async def test_arguments_failing_the_schema_are_a_tool_error_from_mcp_2025_11_25(
    env: Env, version: str | None
) -> None:
    # SEP-1303: a tool execution error, which the model sees and can correct its call by; a
    # -32602 the client keeps from it (found by review)
    client = env.live.client(env.full)
    if version is not None:
        await client.initialize(version)
    reply = await client.call("notes_add", {"text": "ok", "tags": ["not a tag!"]})
    assert reply["result"] == {
        "content": [
            {
                "type": "text",
                "text": 'invalid arguments at /tags/0: "not a tag!" does not match '
                '"^[A-Za-z0-9_.-]{1,64}$"',
            }
        ],
        "isError": True,
    }
    head = env.live.runtime.store.audit_head()
    assert head is not None
    [record] = env.live.runtime.store.read_audit(head.seq - 1, 1)
    event = orjson.loads(record.body)
    assert (event["verb"], event["outcome"], event["code"]) == (
        "call_tool",
        "error",
        "invalid_params",
    )


async def test_unknown_tool_is_tool_not_found(env: Env) -> None:
    reply = await env.live.client(env.full).call("no_such_tool", {})
    error = error_of(reply)
    assert error["code"] == -32602
    assert error["data"]["code"] == "tool_not_found"
    assert error["data"]["tool"] == "no_such_tool"


async def test_tools_call_without_a_name_is_32602(env: Env) -> None:
    reply = await env.live.client(env.full).request("tools/call", {"arguments": {}})
    assert error_of(reply)["code"] == -32602
    assert error_of(reply)["data"]["path"] == "/name"


# -- authentication ------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "not-a-real-token"], ids=["missing", "wrong"])
async def test_missing_or_wrong_token_is_401_with_www_authenticate(
    env: Env, token: str | None
) -> None:
    response = await env.live.client(token).post({"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].lower().startswith("bearer")
    assert response.json()["error"]["code"] == -32001


async def test_a_non_bearer_authorization_is_401(env: Env) -> None:
    client = env.live.client(None)
    response = await client.post(
        {"jsonrpc": "2.0", "id": 1, "method": "ping"}, Authorization="Basic dXNlcjpwdw=="
    )
    assert response.status_code == 401


async def test_refused_credentials_are_counted_in_metrics_not_audited(env: Env) -> None:
    def refused(endpoint: str) -> float:
        body = env.live.runtime.metrics.render()[0].decode()
        line = f'mcp0_unauthorized_total{{endpoint="{endpoint}"}} '
        found = [ln for ln in body.splitlines() if ln.startswith(line)]
        return float(found[0].split()[-1]) if found else 0.0

    audited = len(env.live.runtime.store.read_audit(0, 100_000))
    mcp, admin = refused("mcp"), refused("admin")
    await env.live.client("wrong").post({"jsonrpc": "2.0", "id": 1, "method": "ping"})
    async with httpx2.AsyncClient(timeout=10) as http:
        response = await http.get(
            f"{env.live.base}/api/v1/agents", headers={"Authorization": "Bearer wrong"}
        )
    assert response.status_code == 401
    assert (refused("mcp"), refused("admin")) == (mcp + 1, admin + 1)
    assert len(env.live.runtime.store.read_audit(0, 100_000)) == audited


@pytest.mark.parametrize("verb", ["terminate_agent", "rotate_agent_token"])
async def test_a_body_that_comes_after_its_token_is_revoked_is_401(env: Env, verb: str) -> None:
    # The token was checked as the request's head came, and not again: a body sent after the
    # agent's terminate still ran its call, audited allowed after the terminate (found by
    # review). The 100 Continue says the head was taken (and its token found good).
    runtime = env.live.runtime
    revoke = {
        "terminate_agent": runtime.agents.terminate,
        "rotate_agent_token": runtime.agents.rotate_token,
    }
    doomed = f"doomed-{verb}"
    token = (await runtime.agents.spawn(doomed, ["notes"])).token
    call = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"notes_list"}}'
    reader, writer = await asyncio.open_connection("127.0.0.1", env.live.port)
    try:
        writer.write(
            f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{env.live.port}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Accept: application/json, text/event-stream\r\nExpect: 100-continue\r\n"
            f"Content-Length: {len(call)}\r\n\r\n".encode()
        )
        with anyio.fail_after(10):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            await revoke[verb](doomed)
            writer.write(call)
            assert int((await reader.readline()).split()[1]) == 401
    finally:
        writer.close()
    records = [orjson.loads(e.body) for e in runtime.store.read_audit(0, 100_000)]
    assert [r["verb"] for r in records if doomed in (r["agent"], r["resource"])] == [
        "spawn_agent",
        verb,
    ]


# -- body size -------------------------------------------------------------------------------


async def test_two_mib_body_is_413_under_the_default_limit(env: Env) -> None:
    big = b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": "'
    big += b"x" * (2 << 20) + b'"}}'
    response = await env.live.client(env.full).post_raw(big)
    assert response.status_code == 413
    assert response.json()["error"]["data"]["code"] == "payload_too_large"
    # the server still serves
    assert "result" in await env.live.client(env.full).request("ping")


async def test_body_over_a_small_limit_is_413_and_under_it_is_served(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path / "data", max_body_bytes=200)
    agent = await runtime.agents.spawn("small", [])
    async with serve(runtime) as live:
        client = live.client(agent.token)
        ping = b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}'
        assert (await client.post_raw(ping)).status_code == 200
        padded = b'{"jsonrpc": "2.0", "id": 2, "method": "ping", "params": {"p": "'
        padded += b"y" * 200 + b'"}}'
        response = await client.post_raw(padded)
        assert response.status_code == 413
        # the limit, not the bytes kept to find the body over it (201)
        assert response.json()["error"]["message"].startswith(
            "request body is over the limit of 200 bytes"
        )


# -- media types --------------------------------------------------------------------------------

PING = b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}'
BOTH = "application/json, text/event-stream"


async def post_ping(env: Env, headers: dict[str, str], body: bytes = PING) -> httpx2.Response:
    """POST with exactly these headers (and the token); httpx adds no Content-Type for bytes."""
    async with httpx2.AsyncClient(timeout=20) as http:
        return await http.post(
            env.live.url, content=body, headers={"Authorization": f"Bearer {env.full}", **headers}
        )


@pytest.mark.parametrize(
    ("headers", "status", "says"),
    [
        ({"Accept": BOTH}, 415, "'Content-Type: application/json' (got none)"),
        ({"Content-Type": "text/plain", "Accept": BOTH}, 415, "(got 'text/plain')"),
        (  # what curl -d sends unless told otherwise
            {"Content-Type": "application/x-www-form-urlencoded", "Accept": "*/*"},
            415,
            "(got 'application/x-www-form-urlencoded')",
        ),
        ({"Content-Type": "application/json", "Accept": "application/json"}, 406, "Accept"),
        ({"Content-Type": "application/json", "Accept": "text/event-stream"}, 406, "Accept"),
        ({"Content-Type": "application/json", "Accept": "*/*, text/*;q=0"}, 406, "Accept"),
    ],
)
async def test_a_post_the_transport_does_not_take_is_415_or_406(
    env: Env, headers: dict[str, str], status: int, says: str
) -> None:
    audited = len(env.live.runtime.store.read_audit(0, 100_000))
    response = await post_ping(env, headers)
    assert response.status_code == status
    assert response.json()["error"]["code"] == -32600
    assert says in response.json()["error"]["message"]
    assert len(env.live.runtime.store.read_audit(0, 100_000)) == audited  # nothing ran


async def test_a_compressed_body_is_415_naming_the_encoding(env: Env) -> None:
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip", "Accept": BOTH}
    response = await post_ping(env, headers, gzip.compress(PING))
    assert response.status_code == 415
    assert "Content-Encoding 'gzip' is not supported" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "application/json; charset=utf-8", "Accept": BOTH},
        {"Content-Type": "Application/JSON", "Accept": "*/*"},  # curl's default Accept
        {"Content-Type": "application/json", "Accept": "application/*, text/*;q=0.5"},
        {"Content-Type": "application/json", "Content-Encoding": "identity", "Accept": BOTH},
    ],
)
async def test_the_ways_to_say_json_are_served(env: Env, headers: dict[str, str]) -> None:
    response = await post_ping(env, headers)
    assert response.status_code == 200
    assert response.json()["result"] == {}


# -- policy -------------------------------------------------------------------------------------


async def test_agent_without_the_plugin_is_denied_by_attached_plugins_only(env: Env) -> None:
    reply = await env.live.client(env.bare).call("faulty_echo", {"text": "hi"})
    error = error_of(reply)
    assert error["code"] == -32003
    assert error["data"]["code"] == "policy_denied"
    assert error["data"]["policies"] == ["attached-plugins-only"]
    assert "attached-plugins-only" in error["data"]["reasons"][0]
    assert 'agent "bare"' in error["message"]
    # the bare agent does not even see the tool
    listed = await env.live.client(env.bare).request("tools/list")
    assert listed["result"]["tools"] == []


async def test_an_explicit_forbid_policy_names_its_id_and_reason(env: Env) -> None:
    runtime = env.live.runtime
    forbid = runtime.settings.policy_dir / "zz-no-echo.cedar"
    forbid.write_text(
        '@id("no-faulty-echo")\n'
        '@reason("faulty_echo is switched off for maintenance")\n'
        'forbid (principal, action == Action::"call_tool", resource == Tool::"faulty_echo");\n'
    )
    client = env.live.client(env.full)
    try:
        with anyio.fail_after(10):  # the running server notices the new file by itself
            while "error" not in (reply := await client.call("faulty_echo", {"text": "hi"})):
                await anyio.sleep(0.1)
        error = error_of(reply)
        assert error["code"] == -32003
        assert error["data"]["policies"] == ["no-faulty-echo"]
        assert error["data"]["reasons"] == ["faulty_echo is switched off for maintenance"]
        # other tools of the plugin are still allowed
        assert text_of(await client.call("faulty_nap", {"seconds": 0}))
    finally:
        forbid.unlink()
    with anyio.fail_after(10):  # and that it is gone
        while "error" in await client.call("faulty_echo", {"text": "hi"}):
            await anyio.sleep(0.1)
    assert text_of(await env.live.client(env.full).call("faulty_echo", {"text": "back"})) == "back"


# -- plugin failures ----------------------------------------------------------------------------


async def test_a_crashing_plugin_is_32010_and_the_next_call_succeeds(env: Env) -> None:
    client = env.live.client(env.full)
    reply = await client.call("faulty_crash", {})
    error = error_of(reply)
    assert error["code"] == -32010
    assert error["data"]["code"] == "plugin_crashed"
    # the worker's stderr (shared by the agents using it) is for the server's log only
    assert "secret" not in error["message"]
    assert "server's log" in error["message"]
    # the server keeps serving other plugins, and the crashed one comes back
    assert "result" in await client.request("ping")
    assert text_of(await client.call("faulty_echo", {"text": "alive"})) == "alive"


async def test_a_hanging_plugin_times_out_with_32008_and_recovers(env: Env) -> None:
    client = env.live.client(env.full)
    started = time.monotonic()
    reply = await client.call("faulty_hang", {})
    elapsed = time.monotonic() - started
    error = error_of(reply)
    assert error["code"] == -32008
    assert error["data"]["code"] == "tool_timeout"
    assert 1.4 <= elapsed < 10.0  # the manifest's timeout_ms is 1500
    assert text_of(await client.call("faulty_echo", {"text": "after"})) == "after"


async def test_a_raising_tool_is_a_tool_error_not_a_protocol_error(env: Env) -> None:
    reply = await env.live.client(env.full).call("faulty_raise", {})
    assert reply["result"]["isError"] is True
    assert "raised on purpose" in text_of(reply)


# -- protocol headers and sessions --------------------------------------------------------------


async def test_unsupported_protocol_version_header_is_400(env: Env) -> None:
    client = env.live.client(env.full)
    response = await client.post(
        {"jsonrpc": "2.0", "id": 7, "method": "ping"}, **{"MCP-Protocol-Version": "1999-01-01"}
    )
    assert response.status_code == 400
    assert response.json()["id"] == 7
    assert response.json()["error"]["code"] == UNSUPPORTED_PROTOCOL_VERSION
    assert "1999-01-01" in response.json()["error"]["message"]
    assert "2025-06-18" in response.json()["error"]["data"]["supported"]
    ok = await client.post(
        {"jsonrpc": "2.0", "id": 8, "method": "ping"}, **{"MCP-Protocol-Version": "2025-06-18"}
    )
    assert ok.status_code == 200


async def test_unknown_session_id_is_404(env: Env) -> None:
    client = env.live.client(env.full)
    client.session_id = "0123456789abcdef0123456789abcdef"
    response = await client.post({"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert response.status_code == 404


async def test_a_session_used_with_another_agents_token_is_404(env: Env) -> None:
    owner = env.live.client(env.full)
    await owner.initialize()
    intruder = env.live.client(env.bare)
    intruder.session_id = owner.session_id
    response = await intruder.post({"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert response.status_code == 404
    for method in ("GET", "DELETE"):
        async with httpx2.AsyncClient(verify=False, timeout=10) as http:
            other = await http.request(
                method,
                env.live.url,
                headers=intruder.headers(Accept="text/event-stream"),
            )
        assert other.status_code == 404, method
    # the owner's session is untouched
    assert (await owner.post({"jsonrpc": "2.0", "id": 2, "method": "ping"})).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "evil.example.com"},
        {"Origin": "http://evil.example.com"},
        {"Host": "[::1]evil.example.com"},  # (read as [::1] until the brackets were checked)
        {"Origin": "http://[::1]evil.example.com"},
        {"Host": "localhost:1.evil.example.com"},  # (read as localhost, the "port" unchecked)
        {"Origin": "http://localhost:1.evil.example.com"},
        {"Host": "127.example.net"},  # (a name, whatever it resolves to: it can be rebound)
        {"Host": "127.0.0.1 evil.example.com"},  # (which inet_aton reads as 127.0.0.1)
        # a sandboxed iframe's or a file:// page's (it was let in: found by review)
        {"Origin": "null"},
    ],
    ids=[
        "host",
        "origin",
        "bracketed-host",
        "bracketed-origin",
        "port-host",
        "port-origin",
        "loopback-like-name",
        "address-then-name",
        "null-origin",
    ],
)
async def test_foreign_host_or_origin_is_403_on_loopback(env: Env, headers: dict[str, str]) -> None:
    client = env.live.client(env.full)
    response = await client.post({"jsonrpc": "2.0", "id": 1, "method": "ping"}, **headers)
    assert response.status_code == 403
    local = await client.post(
        {"jsonrpc": "2.0", "id": 2, "method": "ping"},
        Origin=f"http://localhost:{env.live.port}",
    )
    assert local.status_code == 200


@pytest.mark.parametrize(
    "host", ["127.0.0.2", "127.1", "0x7f.0.0.3", "[::1]", "[::ffff:127.0.0.2]", "localhost"]
)
async def test_loopback_addresses_are_accepted_as_host_and_origin_on_loopback(
    env: Env, host: str
) -> None:
    # Only 127.0.0.1 and [::1] were: `mcp0 serve --host 127.0.0.2` refused its own URL with
    # 403 forbidden_origin (found by review)
    client = env.live.client(env.full)
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    assert (await client.post(ping, Host=f"{host}:{env.live.port}")).status_code == 200
    assert (await client.post(ping, Origin=f"http://{host}:3000")).status_code == 200


async def test_allowed_origins_name_origins_or_hosts_in_any_case(tmp_path: Path) -> None:
    """Behind a proxy the Host and the Origin carry one public name: one entry lets both in,
    as browsers and proxies write it (any case; an entry without a port takes any port)."""
    allowed = ("https://MCP.example.com", "proxy.internal")
    async with served_agent(tmp_path / "d", "o", [FAULTY_DIR], allowed_origins=allowed) as env:
        client = env.live.client(env.token)

        async def status(**headers: str) -> int:
            ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
            return (await client.post(ping, **headers)).status_code

        for headers in (
            {"Host": "mcp.example.com"},
            {"Host": "MCP.Example.com:443"},
            {"Host": "mcp.example.com", "Origin": "https://mcp.example.com"},
            {"Host": "proxy.internal:8080", "Origin": "http://PROXY.internal:8080"},
        ):
            assert await status(**headers) == 200, headers
        for headers in (
            {"Host": "evil.example.com"},
            {"Origin": "https://evil.example.com"},
            {"Origin": "https://mcp.example.com.evil.com"},
            {"Origin": "http://mcp.example.com"},  # (an origin entry is that origin only)
        ):
            assert await status(**headers) == 403, headers


async def test_an_absolute_form_target_is_held_to_its_own_host(env: Env) -> None:
    """RFC 9112 has a server take an absolute-form target's authority for the Host: a foreign
    one is refused as a foreign Host header is, a loopback one is served."""
    ping = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'

    async def status_of(target: str) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", env.live.port)
        try:
            writer.write(
                f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1:{env.live.port}\r\n"
                f"Authorization: Bearer {env.full}\r\nContent-Type: application/json\r\n"
                f"Accept: application/json, text/event-stream\r\n"
                f"Content-Length: {len(ping)}\r\n\r\n".encode()
                + ping
            )
            with anyio.fail_after(10):
                return int((await reader.readline()).split()[1])
        finally:
            writer.close()

    assert await status_of("http://evil.example.com/mcp") == 403
    assert await status_of(f"http://127.0.0.1:{env.live.port}/mcp") == 200


async def test_a_call_waiting_for_a_plugin_removed_as_it_starts_gets_an_answer(
    tmp_path: Path,
) -> None:
    # The call waited on the start that the removal cancelled: it was audited `cancelled`
    # and the HTTP request never got a response.
    plugin = tmp_path / "slow"
    plugin.mkdir()
    (plugin / "plugin.json").write_text(
        '{"name": "slow", "version": "1.0.0", "abi": 1, "entry": "slow_plugin:plugin", '
        '"tools": [{"name": "slow_echo", "description": "never", '
        '"inputSchema": {"type": "object"}}]}'
    )
    loading = tmp_path / "data" / "plugin-data" / "slow" / "loading"  # where it may write
    (plugin / "slow_plugin.py").write_text(
        f"import pathlib, time\npathlib.Path({str(loading)!r}).touch()\ntime.sleep(1000)\n"
    )
    runtime = make_runtime(tmp_path / "data")
    runtime.plugins.install(plugin)
    token = (await runtime.agents.spawn("ada", ["slow"])).token
    async with serve(runtime) as live:  # (it waits 3 s for the plugin, then serves)
        with anyio.fail_after(15):
            while not loading.exists():
                await asyncio.sleep(0.02)
        client = live.client(token)
        await client.initialize()
        waiting = asyncio.ensure_future(client.call("slow_echo"))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        runtime.plugins.remove("slow")  # as `mcp0 plugin remove` does; the server follows
        with anyio.fail_after(15):
            error = error_of(await waiting)
        assert error["code"] == -32011  # plugin failure
        assert "while it was still starting" in error["message"]
