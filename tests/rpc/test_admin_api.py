"""The admin API under /api/v1 over HTTP with the admin token: the agent lifecycle (spawn,
list, get, attach, execute, snapshot, rotate the token, terminate, recover), plugins and the
audit log."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import orjson
import pytest
from rpc_live import FAULTY_DIR, NOTES_DIR, LiveServer, make_runtime, serve

from mcp_zero.audit import chain_hash
from mcp_zero.kernel.agents import PRINCIPAL_TTL_S
from mcp_zero.sandbox.isolation import landlock_abi
from plugin_builders import loading_plugin

pytestmark = pytest.mark.anyio
TIMEOUT_S = 20.0
MCP0 = str(Path(sys.executable).parent / "mcp0")
ADMIN_API_DOC = Path(__file__).parents[2] / "docs" / "admin-api.md"


def undocumented(answer: dict[str, Any], route: str) -> set[str]:
    """The keys of ``answer`` that the row of ``route`` in docs/admin-api.md does not name."""
    [row] = [
        line for line in ADMIN_API_DOC.read_text().splitlines() if line.startswith(f"| `{route}` |")
    ]
    return {key for key in answer if f"`{key}`" not in row and f'"{key}"' not in row}


@dataclass
class Admin:
    live: LiveServer
    http: httpx2.AsyncClient

    async def call(self, method: str, path: str, json: Any = None, **kw: Any) -> httpx2.Response:
        return await self.http.request(method, f"{self.live.base}/api/v1{path}", json=json, **kw)


@pytest.fixture(scope="module")
async def live(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LiveServer]:
    runtime = make_runtime(tmp_path_factory.mktemp("admin-api") / "data")
    runtime.plugins.install(NOTES_DIR)
    runtime.plugins.install(FAULTY_DIR)
    async with serve(runtime) as live:
        yield live


@pytest.fixture
async def admin(live: LiveServer) -> AsyncIterator[Admin]:
    token = live.runtime.admin_token()
    async with httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT_S
    ) as http:
        yield Admin(live, http)


@pytest.mark.parametrize(
    "auth", [None, "Bearer wrong", "Basic abc"], ids=["none", "wrong", "basic"]
)
@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/agents"), ("POST", "/agents"), ("GET", "/audit")]
)
async def test_every_route_needs_the_admin_token(
    live: LiveServer, auth: str | None, method: str, path: str
) -> None:
    headers = {"Authorization": auth} if auth else {}
    async with httpx2.AsyncClient(verify=False, timeout=TIMEOUT_S) as http:
        response = await http.request(
            method, f"{live.base}/api/v1{path}", headers=headers, json={"name": "sneaky"}
        )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert live.runtime.store.get_agent("sneaky") is None


async def test_a_plugin_still_starting_is_shown_starting_not_running(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path / "data")
    pid_file = tmp_path / "data" / "plugin-data" / "slow" / "slow.pid"  # its data dir
    runtime.plugins.install(loading_plugin(tmp_path / "slow", pid_file))
    runtime.plugins.install(FAULTY_DIR)
    async with serve(runtime) as live:  # (serves after 3 s, the slow one still starting)
        token = runtime.admin_token()
        async with httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT_S
        ) as http:
            listed = (await http.get(f"{live.base}/api/v1/plugins")).json()
    states = {p["name"]: (p["running"], p.get("starting"), p.get("error")) for p in listed}
    assert states == {"slow": (False, True, None), "faulty": (True, None, None)}
    assert [undocumented(p, "GET /plugins") for p in listed] == [set(), set()]


async def test_a_plugin_whose_start_failed_is_shown_with_why_while_it_is_tried_again(
    tmp_path: Path,
) -> None:
    runtime = make_runtime(tmp_path / "data")
    runtime.plugins.install(FAULTY_DIR)
    (runtime.settings.plugin_data_dir / "faulty").write_text("in the way of its data dir")
    async with serve(runtime) as live:
        token = runtime.admin_token()
        async with httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT_S
        ) as http:
            shown = (await http.get(f"{live.base}/api/v1/plugins/faulty")).json()
    assert shown["running"] is False
    assert "cannot make its data dir" in shown["error"]
    assert shown["failures_in_a_row"] >= 1
    assert undocumented(shown, "GET /plugins/{name}") == set()


async def test_an_agent_token_is_not_an_admin_token(admin: Admin) -> None:
    spawned = (await admin.call("POST", "/agents", {"name": "not-admin"})).json()
    async with httpx2.AsyncClient(verify=False, timeout=TIMEOUT_S) as http:
        response = await http.get(
            f"{admin.live.base}/api/v1/agents",
            headers={"Authorization": f"Bearer {spawned['token']}"},
        )
    assert response.status_code == 401


async def mcp_call(
    live: LiveServer, token: str, tool: str, args: dict[str, Any]
) -> httpx2.Response:
    return await live.client(token).post(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": tool, "arguments": args},
        }
    )


async def test_agent_lifecycle_through_the_admin_api(admin: Admin) -> None:
    live = admin.live
    # spawn: the token is returned once
    created = await admin.call(
        "POST", "/agents", {"name": "worker", "plugins": ["notes"], "state": {"k": 1}}
    )
    assert created.status_code == 201
    body = created.json()
    token = body["token"]
    assert body["name"] == "worker"
    assert body["plugins"] == ["notes"]
    assert body["status"] == "active"
    assert len(token) >= 20
    # list and get never show the token (or its hash)
    listed = (await admin.call("GET", "/agents")).json()
    assert "worker" in [a["name"] for a in listed]
    got = await admin.call("GET", "/agents/worker")
    assert got.status_code == 200
    assert got.json()["state"] == {"k": 1}
    assert token not in got.text
    assert "token" not in got.json()
    assert all("token" not in a for a in listed)
    # the token works on /mcp; faulty is not attached yet
    assert "error" in (await mcp_call(live, token, "faulty_echo", {"text": "x"})).json()
    attached = await admin.call("POST", "/agents/worker/plugins", {"plugin": "faulty"})
    assert attached.status_code == 200
    assert attached.json()["plugins"] == ["notes", "faulty"]
    ok = (await mcp_call(live, token, "faulty_echo", {"text": "attached"})).json()
    assert ok["result"]["content"][0]["text"] == "attached"
    # execute: a governed call as the agent
    executed = await admin.call(
        "POST",
        "/agents/worker/execute",
        {"tool": "faulty_echo", "arguments": {"text": "admin says"}},
    )
    assert executed.status_code == 200
    assert executed.json()["content"][0]["text"] == "admin says"
    # snapshot
    snap = await admin.call("POST", "/agents/worker/snapshot")
    assert snap.status_code == 201
    snapshot_id = snap.json()["snapshot_id"]
    assert snap.json()["data"]["plugins"] == ["notes", "faulty"]
    # terminate: the token stops working at once
    terminated = await admin.call("DELETE", "/agents/worker")
    assert terminated.status_code == 200
    assert terminated.json()["status"] == "terminated"
    assert (await mcp_call(live, token, "faulty_echo", {"text": "x"})).status_code == 401
    again = await admin.call("DELETE", "/agents/worker")  # not terminated (nor audited) twice
    assert again.status_code == 409
    assert again.json()["error"]["message"].startswith("agent 'worker' is already terminated")
    # recover from the snapshot: active again, plugins back, same token
    recovered = await admin.call("POST", f"/snapshots/{snapshot_id}/recover")
    assert recovered.status_code == 200
    assert recovered.json()["status"] == "active"
    assert recovered.json()["plugins"] == ["notes", "faulty"]
    assert recovered.json()["not_restored"] == []
    back = (await mcp_call(live, token, "faulty_echo", {"text": "back"})).json()
    assert back["result"]["content"][0]["text"] == "back"
    # every step is in the audit log
    verbs = [
        (r["verb"], r["resource"])
        for r in (await admin.call("GET", "/audit", params={"limit": 1000})).json()
        if r.get("resource") == "worker"
    ]
    assert verbs == [
        ("spawn_agent", "worker"),
        ("attach_plugin", "worker"),
        ("snapshot_agent", "worker"),
        ("terminate_agent", "worker"),
        ("recover_agent", "worker"),
    ]


async def test_agents_come_a_page_at_a_time_when_asked(admin: Admin) -> None:
    # ?limit was ignored: 21,000 agents were 2 MB in one answer, built on the event loop
    # (found by review)
    for name in ("page-c", "page-a", "page-b"):
        assert (await admin.call("POST", "/agents", {"name": name})).status_code == 201
    every = [a["name"] for a in (await admin.call("GET", "/agents")).json()]
    assert every == sorted(every)
    mine = [name for name in every if name.startswith("page-")]
    assert mine == ["page-a", "page-b", "page-c"]
    first = (await admin.call("GET", "/agents", params={"after": "page-", "limit": "2"})).json()
    assert [a["name"] for a in first] == ["page-a", "page-b"]
    rest = await admin.call("GET", "/agents", params={"after": "page-b", "limit": "2"})
    assert [a["name"] for a in rest.json()][:1] == ["page-c"]
    for params in ({"limit": "0"}, {"limit": "two"}, {"after": ["a", "b"]}):
        refused = await admin.call("GET", "/agents", params=params)
        assert refused.status_code == 400, params


async def test_rotating_a_token_through_the_admin_api_revokes_the_old_one_at_once(
    admin: Admin,
) -> None:
    live = admin.live
    old = (await admin.call("POST", "/agents", {"name": "rotor", "plugins": ["faulty"]})).json()
    client = live.client(old["token"])
    await client.initialize()  # a session opened with the old token
    rotated = await admin.call("POST", "/agents/rotor/token")
    assert rotated.status_code == 200
    new = rotated.json()
    assert new == {**old, "token": new["token"]}
    assert new["token"] != old["token"]
    # the old token's next request, on its session or without one, is refused
    assert (await client.post({"jsonrpc": "2.0", "id": 9, "method": "ping"})).status_code == 401
    assert (await mcp_call(live, old["token"], "faulty_echo", {"text": "x"})).status_code == 401
    # the session the old token opened ended with it: 404 for the new token too, whose
    # holder initializes again
    client.token = new["token"]
    assert (await client.post({"jsonrpc": "2.0", "id": 10, "method": "ping"})).status_code == 404
    client.session_id = None
    await client.initialize()
    echoed = await client.call("faulty_echo", {"text": "rotated"})
    assert echoed["result"]["content"][0]["text"] == "rotated"
    records = (await admin.call("GET", "/audit", params={"limit": 10_000})).json()
    rotation = [r for r in records if r.get("resource") == "rotor"][-1]
    assert (rotation["verb"], rotation["outcome"]) == ("rotate_agent_token", "allowed")
    assert old["token"] not in str(rotation)
    assert new["token"] not in str(rotation)


async def test_a_running_server_takes_up_a_rotation_by_the_cli_within_the_refresh_time(
    admin: Admin,
) -> None:
    # (another process writes the store: the server's remembered principals go stale within
    # PRINCIPAL_TTL_S, as after an `mcp0 agent terminate`)
    live = admin.live
    old = (await admin.call("POST", "/agents", {"name": "rotor-cli", "plugins": ["faulty"]})).json()
    assert (await mcp_call(live, old["token"], "faulty_echo", {"text": "x"})).status_code == 200
    remembered_until = time.monotonic() + PRINCIPAL_TTL_S  # (at the latest)
    data_dir = str(live.runtime.settings.data_dir)
    done = await anyio.run_process(
        [MCP0, "agent", "rotate-token", "rotor-cli", "--json", "--data-dir", data_dir]
    )
    new = orjson.loads(done.stdout)["token"]
    echoed = (await mcp_call(live, new, "faulty_echo", {"text": "new"})).json()
    assert echoed["result"]["content"][0]["text"] == "new"
    with anyio.fail_after(PRINCIPAL_TTL_S + TIMEOUT_S):  # (bounds a stuck server, not the test)
        while (await mcp_call(live, old["token"], "faulty_echo", {"text": "x"})).status_code != 401:
            await anyio.sleep(0.05)
    assert time.monotonic() < remembered_until + 0.5


async def test_rotating_the_token_of_an_unknown_agent_is_404_and_of_a_terminated_one_200(
    admin: Admin,
) -> None:
    unknown = await admin.call("POST", "/agents/nobody-here/token")
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "agent_not_found")
    await admin.call("POST", "/agents", {"name": "rotor-gone"})
    await admin.call("DELETE", "/agents/rotor-gone")
    gone = await admin.call("POST", "/agents/rotor-gone/token")
    assert gone.status_code == 200
    assert gone.json()["status"] == "terminated"
    assert gone.json()["token"]


async def test_execute_is_governed_and_audited(admin: Admin) -> None:
    await admin.call("POST", "/agents", {"name": "exec-bare"})
    denied = await admin.call(
        "POST", "/agents/exec-bare/execute", {"tool": "faulty_echo", "arguments": {"text": "x"}}
    )
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "policy_denied"
    assert denied.json()["error"]["data"]["policies"] == ["attached-plugins-only"]
    records = (await admin.call("GET", "/audit", params={"limit": 10_000})).json()
    mine = [r for r in records if r.get("agent") == "exec-bare" and r["verb"] == "call_tool"]
    assert len(mine) == 1
    assert mine[0]["outcome"] == "denied"
    assert mine[0]["transport"] == "admin"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("GET", "/agents/nobody", None, 404, "agent_not_found"),
        ("DELETE", "/agents/nobody", None, 404, "agent_not_found"),
        ("POST", "/agents", {"name": "bad name!"}, 400, "invalid_params"),
        ("POST", "/agents", {"name": "p", "plugins": ["no-such-plugin"]}, 404, "plugin_not_found"),
        ("POST", "/agents", {"plugins": []}, 400, "invalid_request"),
        ("POST", "/snapshots/snap_missing/recover", None, 404, "snapshot_not_found"),
        ("GET", "/plugins/no-such-plugin", None, 404, "plugin_not_found"),
        ("GET", "/nowhere", None, 404, "not_found"),
        ("GET", "/audit?after=x", None, 400, "invalid_request"),
        ("GET", "/audit?limit=-5", None, 400, "invalid_request"),
        ("GET", "/audit?limit=0", None, 400, "invalid_request"),
        ("GET", "/audit?after=-1", None, 400, "invalid_request"),
        ("GET", "/audit?after=99999999999999999999999", None, 400, "invalid_request"),
        ("GET", "/audit?after=9223372036854775808", None, 400, "invalid_request"),
        ("GET", "/audit?after=" + "9" * 5000, None, 400, "invalid_request"),
        # int() reads these as 10, 40 and 40
        ("GET", "/audit?after=1_0", None, 400, "invalid_request"),
        ("GET", "/audit?after=%20%2040", None, 400, "invalid_request"),
        ("GET", "/audit?after=%EF%BC%94%EF%BC%90", None, 400, "invalid_request"),
        ("GET", "/audit?limit=1_0", None, 400, "invalid_request"),
        ("GET", "/audit?after=&limit=2", None, 400, "invalid_request"),  # (was the default)
        ("GET", "/audit?after=1&after=x", None, 400, "invalid_request"),  # (was the first)
    ],
)
async def test_admin_errors_have_status_and_code(
    admin: Admin, method: str, path: str, body: Any, status: int, code: str
) -> None:
    response = await admin.call(method, path, body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


async def test_execute_records_the_callers_request_id_or_a_fresh_one(admin: Admin) -> None:
    await admin.call("POST", "/agents", {"name": "tagged", "plugins": ["faulty"]})
    call = {"tool": "faulty_echo", "arguments": {"text": "x"}}
    assert (await admin.call("POST", "/agents/tagged/execute", call)).status_code == 200
    assert (await admin.call("POST", "/agents/tagged/execute", call)).status_code == 200
    mine = {**call, "request_id": "deploy-42"}
    assert (await admin.call("POST", "/agents/tagged/execute", mine)).status_code == 200
    bad = await admin.call("POST", "/agents/tagged/execute", {**call, "request_id": 7})
    assert bad.status_code == 400
    records = (await admin.call("GET", "/audit", params={"limit": 10_000})).json()
    ids = [r["request_id"] for r in records if r.get("agent") == "tagged"]
    assert len(ids) == 3
    assert ids[2] == "deploy-42"
    assert all(i.startswith("admin-") for i in ids[:2])
    assert ids[0] != ids[1]


async def test_execute_as_an_unknown_or_terminated_agent_is_404_or_409(admin: Admin) -> None:
    call = {"tool": "faulty_echo", "arguments": {"text": "x"}}
    unknown = await admin.call("POST", "/agents/ghost/execute", call)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "agent_not_found"
    await admin.call("POST", "/agents", {"name": "gone", "plugins": ["faulty"]})
    await admin.call("DELETE", "/agents/gone")
    terminated = await admin.call("POST", "/agents/gone/execute", call)
    assert terminated.status_code == 409
    assert "terminated" in terminated.json()["error"]["message"]


async def test_spawning_a_taken_name_is_409(admin: Admin) -> None:
    assert (await admin.call("POST", "/agents", {"name": "twice"})).status_code == 201
    again = await admin.call("POST", "/agents", {"name": "twice"})
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "conflict"


async def test_a_body_field_the_route_does_not_take_is_400_and_nothing_happens(
    admin: Admin,
) -> None:
    typo = await admin.call("POST", "/agents", {"name": "typo", "plugin": ["faulty"]})
    assert typo.status_code == 400
    message = typo.json()["error"]["message"]
    assert "'plugin'" in message
    assert "name, plugins, state" in message
    assert (await admin.call("GET", "/agents/typo")).status_code == 404  # not half-made
    await admin.call("POST", "/agents", {"name": "strict", "plugins": ["faulty"]})
    call = {"tool": "faulty_echo", "args": {"text": "x"}}
    assert (await admin.call("POST", "/agents/strict/execute", call)).status_code == 400
    snap = await admin.call("POST", "/agents/strict/snapshot", {"label": "x"})
    assert snap.status_code == 400
    assert "takes no body" in snap.json()["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/agents"),
        ("POST", "/agents"),
        ("GET", "/agents/by-query"),
        ("DELETE", "/agents/by-query"),
        ("POST", "/agents/by-query/token"),
        ("POST", "/agents/by-query/plugins"),
        ("POST", "/agents/by-query/execute"),
        ("POST", "/agents/by-query/snapshot"),
        ("POST", "/snapshots/none/recover"),
        ("GET", "/plugins"),
        ("GET", "/plugins/notes"),
        ("GET", "/audit"),
        ("GET", "/audit/verify"),
        ("HEAD", "/audit/verify"),
    ],
)
async def test_a_query_parameter_the_route_does_not_take_is_400_and_nothing_happens(
    admin: Admin, method: str, path: str
) -> None:
    # It was ignored while an unknown body field was refused: "?limt=5" gave a page other than
    # the one asked for, "?dry_run=1" did what it asked not to (found by a docs review)
    before = (await admin.call("GET", "/audit/verify")).json()["count"]
    body = {"name": "by-query"} if path == "/agents" and method == "POST" else None
    refused = await admin.call(method, f"{path}?dry_run=1&x=", json=body)
    assert refused.status_code == 400
    if method != "HEAD":
        error = refused.json()["error"]
        assert error["code"] == "invalid_request"
        lists = method == "GET" and path in ("/agents", "/audit")
        takes = "it takes after, limit" if lists else "it takes none"
        assert error["message"] == f"unknown query parameter(s) 'dry_run', 'x': {takes}"
    assert (await admin.call("GET", "/agents/by-query")).status_code == 404
    assert (await admin.call("GET", "/audit/verify")).json()["count"] == before


async def test_the_query_parameters_a_route_takes_are_taken(admin: Admin) -> None:
    await admin.call("POST", "/agents", {"name": "by-query-a"})
    await admin.call("POST", "/agents", {"name": "by-query-b"})
    for path, after in (("/agents", "by-query-a"), ("/audit", "1")):
        assert (await admin.call("GET", f"{path}?")).status_code == 200
        page = await admin.call("GET", f"{path}?after={after}&limit=1")
        assert page.status_code == 200
        assert len(page.json()) == 1
    [agent] = (await admin.call("GET", "/agents?after=by-query-a&limit=1")).json()
    assert agent["name"] == "by-query-b"


async def test_a_huge_bad_name_is_not_echoed_whole(admin: Admin) -> None:
    response = await admin.call("POST", "/agents", {"name": "x" * 100_000 + "!"})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert len(message) < 300
    assert "100001 characters" in message


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/plugins/", 404), ("GET", "/nothing/", 404), ("PUT", "/agents/", 405)],
)
async def test_a_huge_path_is_not_echoed_whole(
    admin: Admin, method: str, path: str, status: int
) -> None:
    # A plugin name, or a path no route takes, of 60,000 characters came back whole in the
    # message, as the agent names above no longer do (found by a bug hunt)
    response = await admin.call(method, path + "x" * 60_000)
    assert response.status_code == status
    message = response.json()["error"]["message"]
    assert len(message) < 300
    assert "characters)" in message


async def test_malformed_admin_json_is_400(admin: Admin) -> None:
    response = await admin.http.post(f"{admin.live.base}/api/v1/agents", content=b"{nope")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "parse_error"


async def test_plugins_list_and_show(admin: Admin) -> None:
    listed = (await admin.call("GET", "/plugins")).json()
    assert sorted(p["name"] for p in listed) == ["faulty", "notes"]
    assert all("tools" not in p for p in listed)
    assert all(p["running"] is True and "error" not in p for p in listed)
    shown = await admin.call("GET", "/plugins/notes")
    assert shown.status_code == 200
    assert {t["name"] for t in shown.json()["tools"]} == {
        "notes_add",
        "notes_search",
        "notes_list",
        "notes_delete",
    }
    assert shown.json()["quotas"]["max_concurrency"] == 8
    # (it had keys the docs did not name: found by a docs review)
    assert undocumented(shown.json(), "GET /plugins/{name}") == set()
    assert [undocumented(p, "GET /plugins") for p in listed] == [set(), set()]


async def test_audit_list_pages_and_verify(admin: Admin) -> None:
    await admin.call("POST", "/agents", {"name": "audit-a"})
    await admin.call("POST", "/agents", {"name": "audit-b"})
    everything = (await admin.call("GET", "/audit", params={"limit": 10_000})).json()
    seqs = [r["seq"] for r in everything]
    assert seqs == list(range(1, len(seqs) + 1))
    first = (await admin.call("GET", "/audit", params={"after": 0, "limit": 2})).json()
    assert [r["seq"] for r in first] == [1, 2]
    rest = (await admin.call("GET", "/audit", params={"after": 2, "limit": 10_000})).json()
    assert [r["seq"] for r in rest] == seqs[2:]
    assert everything[1]["prev_hash"] == everything[0]["hash"]
    verified = (await admin.call("GET", "/audit/verify")).json()
    assert verified["ok"] is True
    assert verified["count"] == len(seqs)
    assert verified["head_seq"] == seqs[-1]
    assert verified["head_hash"] == everything[-1]["hash"]


async def test_damaged_audit_records_are_listed_as_such_and_verify_reports_the_first(
    tmp_path: Path,
) -> None:
    # GET /audit was a 500 on a body that is not JSON, and both were on one edited to a number
    runtime = make_runtime(tmp_path / "data")
    for name in ("a", "b", "c", "d"):
        await runtime.agents.spawn(name, [])
    async with (
        serve(runtime) as live,
        httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {runtime.admin_token()}"}, timeout=TIMEOUT_S
        ) as http,
    ):
        whole = (await http.get(f"{live.base}/api/v1/audit")).json()
        assert not any("damaged" in record for record in whole)
        seqs = [record["seq"] for record in whole if record["verb"] == "spawn_agent"]
        edits = [
            "body = 1.5",
            "body = X'41'",
            "body = replace(body, '\"allowed\"', 'null')",
            'body = replace(body, \'"allowed"\', \'"allowed","seq":1\')',
        ]
        with contextlib.closing(sqlite3.connect(runtime.settings.db_path)) as raw, raw:
            raw.execute("DROP TRIGGER audit_no_update")
            for seq, edit in zip(seqs, edits, strict=True):
                raw.execute(f"UPDATE audit SET {edit} WHERE seq = ?", (seq,))
        listed = await http.get(f"{live.base}/api/v1/audit")
        verified = (await http.get(f"{live.base}/api/v1/audit/verify")).json()
    assert listed.status_code == 200, listed.text
    damaged = [record for record in listed.json() if record["seq"] in seqs]
    assert [record["seq"] for record in damaged] == seqs  # the store's, whatever a body says
    assert [record["damaged"] for record in damaged] == [
        "body is not a JSON object",
        "body is not JSON",
        "hash does not match prev_hash and body",
        "hash does not match prev_hash and body",
    ]
    assert [record.get("resource") for record in damaged] == [None, None, "c", "d"]
    assert damaged[2]["outcome"] is None
    assert verified == {
        "ok": False,
        "seq": seqs[0],
        "reason": "hash does not match prev_hash and body",
    }


async def test_a_record_forged_too_deep_to_encode_is_listed_as_damaged(tmp_path: Path) -> None:
    # its hash made right, a body nested past what the encoder takes (254 levels) failed
    # verification with a TypeError and the listing's answer with a 500
    runtime = make_runtime(tmp_path / "data")
    async with (
        serve(runtime) as live,
        httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {runtime.admin_token()}"}, timeout=TIMEOUT_S
        ) as http,
    ):
        head = runtime.store.audit_head()
        assert head is not None
        body = b'{"deep":' + b"[" * 300 + b"]" * 300 + b',"ts":1.0}'
        forged = (head.seq + 1, 1.0, body, head.hash, chain_hash(head.hash, body))
        with contextlib.closing(sqlite3.connect(runtime.settings.db_path)) as raw, raw:
            raw.execute("INSERT INTO audit VALUES (?, ?, ?, ?, ?)", forged)
        listed = await http.get(f"{live.base}/api/v1/audit", params={"after": head.seq})
        verified = (await http.get(f"{live.base}/api/v1/audit/verify")).json()
    assert listed.status_code == 200, listed.text
    assert listed.json() == [
        {
            "seq": forged[0],
            "hash": forged[4],
            "prev_hash": head.hash,
            "damaged": "body is not in canonical form",
        }
    ]
    assert verified == {"ok": False, "seq": forged[0], "reason": "body is not in canonical form"}


LONG_LOG = 200_000  # ~8 us a record to verify: over a second here


async def test_verifying_a_long_log_does_not_stop_the_governed_path(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # A log of millions of records takes minutes to verify; this one, a second or two. Calls
    # made meanwhile must be answered before the verification ends.
    runtime = make_runtime(tmp_path_factory.mktemp("long-log") / "data", audit_max_batch=10_000)
    runtime.plugins.install(FAULTY_DIR)
    token = (await runtime.agents.spawn("busy", ["faulty"])).token
    event = {"agent": "busy", "verb": "call_tool", "resource": "faulty_echo", "outcome": "allowed"}
    for start in range(0, LONG_LOG, 10_000):
        await asyncio.gather(
            *(
                runtime.audit.submit({**event, "request_id": str(i)})
                for i in range(start, start + 10_000)
            )
        )
    async with (
        serve(runtime) as live,
        httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {runtime.admin_token()}"}, timeout=TIMEOUT_S
        ) as http,
    ):
        verifying = asyncio.ensure_future(http.get(f"{live.base}/api/v1/audit/verify"))
        await asyncio.sleep(0.1)  # the verification is under way
        answered = 0
        while not verifying.done():
            reply = await mcp_call(live, token, "faulty_echo", {"text": "meanwhile"})
            assert "meanwhile" in reply.text
            answered += not verifying.done()
        assert answered > 0  # answered while the verification still ran
        verified = (await verifying).json()
    assert verified["ok"] is True
    assert verified["count"] > LONG_LOG


async def test_the_admin_token_rotates_without_a_restart(admin: Admin) -> None:
    runtime = admin.live.runtime
    path = runtime.settings.admin_token_path
    original = path.read_text()
    url = f"{admin.live.base}/api/v1/agents"

    async def status_with(token: str) -> int:
        async with httpx2.AsyncClient(timeout=TIMEOUT_S) as http:
            response = await http.get(url, headers={"Authorization": f"Bearer {token}"})
        return response.status_code

    async def taken_up(check: Any) -> None:
        with anyio.fail_after(TIMEOUT_S):  # the server's watcher looks every second
            while not await check():
                await anyio.sleep(0.1)

    try:
        path.write_text("mcp0_rotated-for-the-test\n")
        await taken_up(lambda: _is(status_with(original.strip()), 401))
        assert await status_with("mcp0_rotated-for-the-test") == 200
        path.write_text("")  # an empty file closes the admin API
        await taken_up(lambda: _is(status_with("mcp0_rotated-for-the-test"), 401))
        async with httpx2.AsyncClient(timeout=TIMEOUT_S) as http:
            closed = await http.get(url, headers={"Authorization": "Bearer anything"})
        assert "holds no token" in closed.json()["error"]["message"]
    finally:
        path.write_text(original)
        await taken_up(lambda: _is(status_with(original.strip()), 200))

    def changes() -> list[Any]:
        return [
            orjson.loads(e.body)
            for e in runtime.store.read_audit(0, 100_000)
            if orjson.loads(e.body)["verb"] == "change_admin_token"
            and "at_start" not in orjson.loads(e.body)  # (the token it started with)
        ]

    with anyio.fail_after(TIMEOUT_S):  # the last record commits a moment after the token
        while len(changes()) < 3:
            await anyio.sleep(0.05)
    assert [(c["transport"], c["outcome"]) for c in changes()] == [
        ("files", "allowed"),
        ("files", "error"),
        ("files", "allowed"),
    ]


async def _is(status: Any, expected: int) -> bool:
    return bool(await status == expected)


async def test_a_plugin_the_server_does_not_run_says_why(tmp_path: Any) -> None:
    runtime = make_runtime(tmp_path / "data", max_workers=1)
    runtime.plugins.install(FAULTY_DIR)
    runtime.plugins.install(NOTES_DIR)  # "faulty" comes first and takes the only worker
    async with serve(runtime) as live:
        headers = {"Authorization": f"Bearer {runtime.admin_token()}"}
        async with httpx2.AsyncClient(headers=headers, timeout=TIMEOUT_S) as http:
            listed = (await http.get(f"{live.base}/api/v1/plugins")).json()
            shown = (await http.get(f"{live.base}/api/v1/plugins/notes")).json()
    states = {p["name"]: (p["running"], p.get("error")) for p in listed}
    assert states["faulty"] == (True, None)
    # what of its sandbox held here: the faulty plugin is granted no network
    [faulty] = [p for p in listed if p["name"] == "faulty"]
    assert faulty["sandbox"]["files_confined"] is (landlock_abi() >= 1)
    assert faulty["sandbox"]["syscalls_restricted"] is True  # (x86_64 and aarch64: CI's)
    assert faulty["sandbox"]["unprivileged"] is True  # a root server's workers are nobody
    if os.geteuid() == 0:  # root can always unshare; others only with user namespaces
        assert faulty["sandbox"]["network_isolated"] is True
        assert faulty["sandbox"]["mounts_confined"] is True
        assert faulty["sandbox"]["processes_hidden"] is True
    assert "sandbox" not in shown  # not running
    assert states["notes"][0] is False
    assert "0 of the server's max_workers = 1 are free" in states["notes"][1]
    assert shown["running"] is False
    assert shown["error"] == states["notes"][1]


async def test_a_state_too_deep_to_show_again_is_400_and_nothing_happens(admin: Admin) -> None:
    # Stored, it would make every later GET /agents a 500 (JSON answers end at 254 levels,
    # and the listing holds a state 2 levels down, as a snapshot's answer does).
    for levels in (253, 300):
        body = b'{"name": "deep", "state": ' + _nested(levels) + b"}"
        refused = await admin.http.post(f"{admin.live.base}/api/v1/agents", content=body)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["data"]["path"] == "/state"
        assert "at most 252 levels" in error["message"]
        assert (await admin.call("GET", "/agents/deep")).status_code == 404
        assert (await admin.call("GET", "/agents")).status_code == 200
    # the deepest state that fits is kept as given, and every answer carrying it is written
    fits = await admin.http.post(
        f"{admin.live.base}/api/v1/agents",
        content=b'{"name": "deep-ok", "state": ' + _nested(252) + b"}",
    )
    assert fits.status_code == 201, fits.text
    shown = (await admin.call("GET", "/agents/deep-ok")).json()["state"]
    assert orjson.dumps(shown) == _nested(252)
    listed = await admin.call("GET", "/agents")
    assert listed.status_code == 200, listed.text
    [agent] = [a for a in listed.json() if a["name"] == "deep-ok"]
    assert orjson.dumps(agent["state"]) == _nested(252)
    snap = await admin.call("POST", "/agents/deep-ok/snapshot")
    assert snap.status_code == 201, snap.text
    assert orjson.dumps(snap.json()["data"]["state"]) == _nested(252)
    recovered = await admin.call("POST", f"/snapshots/{snap.json()['snapshot_id']}/recover")
    assert recovered.status_code == 200, recovered.text
    assert orjson.dumps(recovered.json()["state"]) == _nested(252)


async def test_spawn_and_recover_do_not_grant_a_plugin_the_policy_forbids_to_attach(
    tmp_path: Path,
) -> None:
    runtime = make_runtime(tmp_path / "data")
    runtime.plugins.install(NOTES_DIR)
    runtime.plugins.install(FAULTY_DIR)
    async with serve(runtime) as live:
        headers = {"Authorization": f"Bearer {runtime.admin_token()}"}
        async with httpx2.AsyncClient(headers=headers, timeout=TIMEOUT_S) as http:
            admin = Admin(live, http)
            assert (
                await admin.call("POST", "/agents", {"name": "a1", "plugins": ["faulty"]})
            ).status_code == 201
            snap = (await admin.call("POST", "/agents/a1/snapshot")).json()["snapshot_id"]
            (runtime.settings.policy_dir / "no-faulty.cedar").write_text(
                '@id("no-faulty-attach")\n'
                '@reason("faulty may not be granted to any agent")\n'
                'forbid (principal, action == Action::"attach_plugin", resource)\n'
                'when { context has plugin && context.plugin == "faulty" };\n'
            )
            runtime.policy.reload()
            attach = await admin.call("POST", "/agents/a1/plugins", {"plugin": "faulty"})
            assert attach.status_code == 403
            spawn = await admin.call("POST", "/agents", {"name": "a2", "plugins": ["faulty"]})
            assert spawn.status_code == 403, spawn.text
            assert spawn.json()["error"]["data"]["policies"] == ["no-faulty-attach"]
            assert (await admin.call("GET", "/agents/a2")).status_code == 404
            assert (await admin.call("DELETE", "/agents/a1")).status_code == 200
            recovered = await admin.call("POST", f"/snapshots/{snap}/recover")
            assert recovered.status_code == 200, recovered.text
            assert recovered.json()["plugins"] == []
            [left_out] = recovered.json()["not_restored"]
            assert left_out["plugin"] == "faulty"
            assert "faulty may not be granted to any agent" in left_out["reason"]


async def test_a_recover_that_would_terminate_an_agent_the_policy_keeps_is_403(
    tmp_path: Path,
) -> None:
    # It terminated the agent: only recover_agent was decided (found by review)
    runtime = make_runtime(tmp_path / "data")
    async with serve(runtime) as live:
        headers = {"Authorization": f"Bearer {runtime.admin_token()}"}
        async with httpx2.AsyncClient(headers=headers, timeout=TIMEOUT_S) as http:
            admin = Admin(live, http)
            assert (await admin.call("POST", "/agents", {"name": "q"})).status_code == 201
            active = (await admin.call("POST", "/agents/q/snapshot")).json()["snapshot_id"]
            assert (await admin.call("DELETE", "/agents/q")).status_code == 200
            snap = (await admin.call("POST", "/agents/q/snapshot")).json()["snapshot_id"]
            (runtime.settings.policy_dir / "keep-q.cedar").write_text(
                '@id("keep-q")\n'
                'forbid (principal, action == Action::"terminate_agent", resource == Agent::"q");\n'
            )
            runtime.policy.reload()
            assert (await admin.call("POST", f"/snapshots/{active}/recover")).status_code == 200
            refused = await admin.call("POST", f"/snapshots/{snap}/recover")
            assert refused.status_code == 403, refused.text
            assert refused.json()["error"]["data"]["policies"] == ["keep-q"]
            assert (await admin.call("GET", "/agents/q")).json()["status"] == "active"


def _nested(levels: int) -> bytes:
    return b'{"a":' * levels + b"1" + b"}" * levels


async def test_an_integer_past_64_bits_is_400_naming_where_not_a_float(admin: Admin) -> None:
    # It was read as a float: a state stored as 1.2345678901234568e+29, arguments passed to
    # the plugin changed (found by review).
    wide = b"123456789012345678901234567890"
    spawned = await admin.call(
        "POST", "/agents", content=b'{"name": "wide", "state": {"n": %s}}' % wide
    )
    assert spawned.status_code == 400, spawned.text
    assert spawned.json()["error"]["data"] == {"path": "/state/n"}
    assert "integer past 64 bits" in spawned.json()["error"]["message"]
    assert (await admin.call("GET", "/agents/wide")).status_code == 404  # not created
    await admin.call("POST", "/agents", {"name": "wide", "plugins": ["faulty"]})
    body = b'{"tool": "faulty_echo", "arguments": {"text": "x", "n": %s}}' % wide
    executed = await admin.call("POST", "/agents/wide/execute", content=body)
    assert executed.status_code == 400, executed.text
    assert executed.json()["error"]["data"] == {"path": "/arguments/n"}


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/agents/default", "GET, HEAD, DELETE, OPTIONS"),
        ("PATCH", "/agents", "GET, HEAD, POST, OPTIONS"),
        ("GET", "/agents/someone/execute", "POST, OPTIONS"),
    ],
)
async def test_a_method_a_route_does_not_take_is_405_with_what_it_takes(
    admin: Admin, method: str, path: str, allow: str
) -> None:
    # It was 404 "no admin route", as if the path were unknown (found by review)
    response = await admin.call(method, path)
    assert response.status_code == 405, response.text
    assert response.headers["allow"] == allow
    assert response.json()["error"]["code"] == "method_not_allowed"
    options = await admin.call("OPTIONS", path)
    assert (options.status_code, options.headers["allow"], options.content) == (204, allow, b"")


async def test_head_on_an_admin_route_is_its_get_without_the_body(admin: Admin) -> None:
    got = await admin.call("GET", "/plugins")
    head = await admin.call("HEAD", "/plugins")
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-type"] == got.headers["content-type"]
    assert head.headers["content-length"] == str(len(got.content))
