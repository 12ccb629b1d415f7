"""Another process holding the store's write lock (a CLI command writing to the same data
dir) holds up the calls whose records wait for it, not the server."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import orjson
import pytest
from rpc_live import CALL_TIMEOUT_S, FAULTY_DIR, NOTES_DIR, error_of, make_runtime, serve, text_of

from mcp_zero.audit.chain import verify_store
from mcp_zero.audit.log import ROOM_CHECK_S
from mcp_zero.runtime import Runtime
from mcp_zero.storage.sqlite import SqliteStore

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def outcomes(runtime: Runtime, match: str) -> list[str]:
    """The outcomes of the records whose request id or resource is ``match``."""
    with SqliteStore(runtime.settings.db_path) as store:
        bodies = [orjson.loads(e.body) for e in store.read_audit(0, 10_000)]
    return [b["outcome"] for b in bodies if match in (b.get("request_id"), b.get("resource"))]


async def test_the_server_answers_while_another_process_holds_the_store(tmp_path: Path) -> None:
    data = tmp_path / "data"
    runtime = make_runtime(data, rate_limit=0)
    runtime.plugins.install(FAULTY_DIR)
    token = (await runtime.agents.spawn("alice", ["faulty"])).token
    async with serve(runtime) as live:
        client = live.client(token)
        other = sqlite3.connect(data / "mcp0.db", isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # as `mcp0 agent create` does, for a moment
            call = asyncio.create_task(client.call("faulty_echo", {"text": "locked"}))
            with anyio.fail_after(CALL_TIMEOUT_S):
                # the call ran; its record found the store locked and waits for it
                while runtime.audit.stats.busy_retries == 0:
                    assert not call.done(), call.result()
                    await asyncio.sleep(0.01)
            async with httpx2.AsyncClient(verify=False) as http:
                with anyio.fail_after(CALL_TIMEOUT_S):
                    health = await http.get(f"{live.base}/healthz")
                    ping = await live.client(token).request("ping")
            assert health.status_code == 200
            assert ping["result"] == {}
            assert not call.done()  # no answer before its record is durable
            other.execute("ROLLBACK")  # the lock goes only once the server has answered
        finally:
            other.close()
        with anyio.fail_after(CALL_TIMEOUT_S):
            reply = await call
        assert text_of(reply) == "locked"
    with SqliteStore(data / "mcp0.db") as store:
        bodies = [orjson.loads(e.body) for e in store.read_audit(0, 10_000)]
        assert [b["outcome"] for b in bodies if b.get("resource") == "faulty_echo"] == ["allowed"]
        assert verify_store(store).count == len(bodies)


@contextlib.contextmanager
def store_held(data: Path) -> Iterator[sqlite3.Connection]:
    """The store's write lock, held by another process's connection until it is rolled back
    (or the block ends)."""
    other = sqlite3.connect(data / "mcp0.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # as `mcp0 agent create` does, for a moment
        yield other
    finally:
        other.close()


async def until_its_record_waits(runtime: Runtime, call: asyncio.Task[Any]) -> None:
    with anyio.fail_after(CALL_TIMEOUT_S):
        while runtime.audit.stats.busy_retries == 0:  # it ran; its record waits for the lock
            assert not call.done(), call.result()
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("stop", ["notifications/cancelled", "DELETE"])
async def test_a_call_stopped_while_its_record_waits_is_answered_as_recorded(
    tmp_path: Path, stop: str
) -> None:
    # It was answered -32800 "cancelled" (or -32001 session_ended) at once, and its record,
    # committed later, said allowed (found by review)
    data = tmp_path / "data"
    runtime = make_runtime(data, rate_limit=0)
    runtime.plugins.install(FAULTY_DIR)
    token = (await runtime.agents.spawn("alice", ["faulty"])).token
    async with serve(runtime) as live:
        client = live.client(token)
        await client.initialize()
        with store_held(data) as other:
            body = {"jsonrpc": "2.0", "id": "cut", "method": "tools/call"}
            body["params"] = {"name": "faulty_echo", "arguments": {"text": "done"}}
            call = asyncio.create_task(client.post(body))
            await until_its_record_waits(runtime, call)
            if stop == "DELETE":
                async with httpx2.AsyncClient(verify=False) as http:
                    ended = await http.delete(live.url, headers=client.headers())
                assert ended.status_code == 204
            else:
                cancel = {"requestId": "cut", "reason": "late"}
                await client.post({"jsonrpc": "2.0", "method": stop, "params": cancel})
            assert not call.done()  # no answer before its record is durable
            other.execute("ROLLBACK")
        with anyio.fail_after(CALL_TIMEOUT_S):
            reply = (await call).json()
        assert text_of(reply) == "done"
        assert outcomes(runtime, "cut") == ["allowed"]


@pytest.mark.parametrize("version", ["2025-11-25", "2026-07-28"])
async def test_a_call_whose_record_waits_when_the_server_stops_is_answered_with_its_result(
    tmp_path: Path, version: str
) -> None:
    # It was answered -32013 "the server ... stopped this request; retry it": a client doing so
    # would have done it twice (found by review)
    data = tmp_path / "data"
    runtime = make_runtime(data, rate_limit=0)
    runtime.plugins.install(FAULTY_DIR)
    token = (await runtime.agents.spawn("alice", ["faulty"])).token
    async with serve(runtime, grace=0.05) as live:
        client = live.client(token)
        params: dict[str, Any] = {"name": "faulty_echo", "arguments": {"text": "done"}}
        headers = {}
        if version == "2026-07-28":
            params["_meta"] = {
                "io.modelcontextprotocol/protocolVersion": version,
                "io.modelcontextprotocol/clientCapabilities": {},
            }
            headers = {"MCP-Protocol-Version": version, "Mcp-Method": "tools/call"}
            headers["Mcp-Name"] = "faulty_echo"
        with store_held(data) as other:
            call = asyncio.create_task(client.request("tools/call", params, **headers))
            await until_its_record_waits(runtime, call)
            live.server.stop()
            with anyio.fail_after(CALL_TIMEOUT_S):  # cut off after its grace
                while not any(task.cancelling() for task in live.server.tasks):
                    assert not call.done(), call.result()
                    await asyncio.sleep(0.01)
            other.execute("ROLLBACK")
        with anyio.fail_after(CALL_TIMEOUT_S):
            reply = await call
        assert text_of(reply) == "done"
    assert outcomes(runtime, "faulty_echo") == ["allowed"]


async def test_an_admin_change_waits_for_another_process_without_holding_up_calls(
    tmp_path: Path,
) -> None:
    # An agent change and its record are one transaction: it waits for the other writer's
    # lock, in a thread, where it used to wait on the loop (up to the busy timeout, 5 s)
    data = tmp_path / "data"
    runtime = make_runtime(data, rate_limit=0)
    runtime.plugins.install(FAULTY_DIR)
    token = (await runtime.agents.spawn("alice", [])).token
    admin = {"Authorization": f"Bearer {runtime.admin_token()}"}
    async with serve(runtime) as live, httpx2.AsyncClient(headers=admin, timeout=60) as http:
        other = sqlite3.connect(data / "mcp0.db", isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            attach = asyncio.create_task(
                http.post(f"{live.base}/api/v1/agents/alice/plugins", json={"plugin": "faulty"})
            )
            await asyncio.sleep(0.3)  # the attach is waiting for the lock by now
            with anyio.fail_after(2):  # well inside the busy timeout the attach may wait
                health = await http.get(f"{live.base}/healthz")
                ping = await live.client(token).request("ping")
            assert health.status_code == 200
            assert ping["result"] == {}
            assert not attach.done()
            other.execute("ROLLBACK")
        finally:
            other.close()
        with anyio.fail_after(CALL_TIMEOUT_S):
            attached = await attach
        assert attached.status_code == 200, attached.text
        assert attached.json()["plugins"] == ["faulty"]


@contextlib.asynccontextmanager
async def notes_served(data: Path) -> AsyncIterator[tuple[Runtime, Any, httpx2.AsyncClient, str]]:
    """A live server on ``data`` with the notes plugin, agent alice's client of it, an HTTP
    client and the server's /readyz."""
    runtime = make_runtime(data, rate_limit=0)
    runtime.plugins.install(NOTES_DIR)
    token = (await runtime.agents.spawn("alice", ["notes"])).token
    async with serve(runtime) as live, httpx2.AsyncClient() as http:
        yield runtime, live.client(token), http, f"{live.base}/readyz"


async def test_calls_wait_while_records_wait_for_a_lock_and_never_act_once_they_failed(
    tmp_path: Path,
) -> None:
    # A second after a commit failed on another process's lock, the log took calls again
    # while the lock was still held: each ran its plugin (a note added) and left no record.
    # And calls taken while a batch waited for the lock acted, their records failing with it.
    # /readyz said ready all along (found by review)
    data = tmp_path / "data"
    async with notes_served(data) as (runtime, client, http, readyz):
        with store_held(data) as other:
            first = asyncio.create_task(client.call("notes_add", {"text": "acted first"}))
            with anyio.fail_after(CALL_TIMEOUT_S):  # it acted; its record waits for the lock
                while runtime.audit.stats.blocked_since is None:
                    assert not first.done(), first.result()
                    await asyncio.sleep(0.01)
            second = asyncio.create_task(client.call("notes_add", {"text": "waited"}))
            with anyio.fail_after(CALL_TIMEOUT_S):
                while (await http.get(readyz)).status_code == 200:
                    await asyncio.sleep(0.05)
            assert (await http.get(readyz)).json() == {"ready": False, "audit": "blocked"}
            assert not second.done()
            with anyio.fail_after(CALL_TIMEOUT_S):  # the store's busy timeout (5 s) passes
                failed = await first
                refused = await second
            assert "database is locked" in error_of(failed)["message"]
            assert "the audit log cannot be written" in error_of(refused)["message"]
            await asyncio.sleep(ROOM_CHECK_S)  # asked again: it is still locked
            assert (await http.get(readyz)).json() == {"ready": False, "audit": "failing"}
            refused = await client.call("notes_add", {"text": "still locked"})
            assert "the audit log cannot be written" in error_of(refused)["message"]
            other.execute("ROLLBACK")
        with anyio.fail_after(CALL_TIMEOUT_S):
            while (await http.get(readyz)).status_code != 200:
                await asyncio.sleep(0.05)
        listed = text_of(await client.call("notes_list", {}))
    # (a call that had acted as the lock came lost its record: the gap the docs name)
    assert "acted first" in listed
    assert "waited" not in listed
    assert "still locked" not in listed
    with SqliteStore(data / "mcp0.db") as store:
        assert verify_store(store).count == len(store.read_audit(0, 10_000))


async def test_a_call_after_another_process_took_the_lock_waits_for_it_before_acting(
    tmp_path: Path,
) -> None:
    # Taken 2 s before, with no call running, the lock was found by no batch: the next call
    # ran its plugin (a note added), and its record failed with the lock held past the busy
    # timeout (found by review). The server's look every second now holds calls first.
    data = tmp_path / "data"
    async with notes_served(data) as (runtime, client, http, readyz):
        with store_held(data) as other:
            with anyio.fail_after(CALL_TIMEOUT_S):  # found by a look, with no call running
                while runtime.audit.stats.blocked_since is None:
                    await asyncio.sleep(0.05)
            call = asyncio.create_task(client.call("notes_add", {"text": "after the lock"}))
            with anyio.fail_after(CALL_TIMEOUT_S):
                while (await http.get(readyz)).status_code == 200:
                    await asyncio.sleep(0.05)
            assert not call.done()
            assert noted(data) == []  # it waits: its plugin has not acted
            other.execute("ROLLBACK")
        with anyio.fail_after(CALL_TIMEOUT_S):
            added = await call
        assert "after the lock" in text_of(added)
    assert noted(data) == ["after the lock"]
    assert outcomes(runtime, "notes_add") == ["allowed"]


def noted(data: Path) -> list[str]:
    """The texts of the notes the notes plugin has stored, read from its own database."""
    db = data / "plugin-data" / "notes" / "notes.db"
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return [text for (text,) in conn.execute("SELECT text FROM notes")]
