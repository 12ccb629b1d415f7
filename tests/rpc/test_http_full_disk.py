"""A full store: calls get a clear storage error, nothing acknowledged is lost, and the
chain goes on once there is room again."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import orjson
import pytest
from rpc_live import FAULTY_DIR, LiveServer, McpHttp, error_of, make_runtime, serve

from mcp_zero.audit.chain import verify_store
from mcp_zero.errors import STORAGE_FAILURE, StorageError
from mcp_zero.runtime import Runtime
from mcp_zero.storage.sqlite import SqliteStore

JSON = dict[str, Any]
pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.asynccontextmanager
async def bumped_once(data: Path) -> AsyncIterator[tuple[Runtime, LiveServer, McpHttp, JSON]]:
    """:func:`small_store` served, its faulty_bump called once (it counts its runs): the
    runtime, the server, the agent's client and the bump call's params."""
    runtime, token = await small_store(data)
    async with serve(runtime) as live:
        client = live.client(token)
        bump = {"name": "faulty_bump", "arguments": {}}
        assert "bumped to 1" in str(await client.request("tools/call", bump))
        yield runtime, live, client, bump


async def small_store(data: Path) -> tuple[Runtime, str]:
    """A runtime whose store holds 1 MiB, with the faulty plugin and an agent using it."""
    runtime = make_runtime(data, db_max_mb=1, rate_limit=0, audit_window_ms=0)
    runtime.plugins.install(FAULTY_DIR)
    return runtime, (await runtime.agents.spawn("filler", ["faulty"])).token


async def test_a_full_store_refuses_calls_clearly_and_loses_no_acknowledged_record(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    runtime, token = await small_store(data)
    answered: list[int] = []
    refused: list[dict[str, object]] = []
    async with serve(runtime) as live:
        client = live.client(token)

        async def fill(worker: int) -> None:
            for i in range(5_000):
                if len(refused) >= 3:
                    return
                reply = await client.request(
                    "tools/call", {"name": "faulty_echo", "arguments": {"text": f"{worker}/{i}"}}
                )
                if "error" in reply:
                    refused.append(error_of(reply))
                else:
                    answered.append(reply["id"])

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for worker in range(16):
                    tg.start_soon(fill, worker)
        assert refused, "the 1 MiB store never filled up"
        for error in refused:
            assert error["code"] == STORAGE_FAILURE
            assert "full" in str(error["message"])
        health = await client.request("ping")
        assert health["result"] == {}
    # Every answered call has its record, and the chain verifies.
    with SqliteStore(data / "mcp0.db") as store:
        entries = store.read_audit(0, 1_000_000)
        assert set(answered) <= {orjson.loads(e.body).get("request_id") for e in entries}
        assert verify_store(store).count == len(entries)
    # What a failed commit lost (its calls had acted) waits in a note for a record; none
    # when the server found the store full before a commit failed (it looks every second)
    note = data / "audit-lost.json"
    lost = orjson.loads(note.read_bytes())["failed_events"] if note.exists() else 0
    # With room again (a bigger cap), the same data dir goes on where the chain stopped.
    again = make_runtime(data, db_max_mb=4, rate_limit=0)
    async with serve(again) as live:
        reply = await live.client(token).request(
            "tools/call", {"name": "faulty_echo", "arguments": {"text": "room again"}}
        )
    assert reply["result"]["content"][0]["text"] == "room again"
    with SqliteStore(data / "mcp0.db") as store:
        # the restart's record of the events the full store lost, if any, then the call
        assert verify_store(store).count == len(entries) + 1 + (lost > 0)
        if lost:
            said = orjson.loads(store.read_audit(len(entries), 1)[0].body)
            assert (said["verb"], said["failed_before_restart"]) == ("resume_audit_log", lost)
    assert not note.exists()


async def test_once_the_log_cannot_be_written_calls_are_refused_before_the_plugin_acts(
    tmp_path: Path,
) -> None:
    # A call whose record cannot be kept must not run: after the first failed commit, the
    # plugin is not reached (faulty_bump counts its runs) until the store has room again.
    data = tmp_path / "data"
    async with bumped_once(data) as (runtime, live, client, bump):
        with anyio.fail_after(120):
            for i in range(100_000):
                echo = {"name": "faulty_echo", "arguments": {"text": "x" * 200 + str(i)}}
                if "error" in await client.request("tools/call", echo):
                    break
        refused = await client.request("tools/call", bump)
        assert error_of(refused)["code"] == STORAGE_FAILURE  # (and its record failed too)
        # the refusal says why, not only that its own record failed as well
        message = str(error_of(refused)["message"])
        assert "refused until it can be written again" in message
        assert "full" in message  # what the last commit failed of (a lock held: that)
        async with httpx2.AsyncClient() as http:
            ready = await http.get(f"{live.base}/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"ready": False, "audit": "failing"}

        # A record that still fits does not reopen the log: its calls' would not fit.
        assert error_of(await client.request("tools/call", bump))["code"] == STORAGE_FAILURE

        # Room again (as if the disk were freed): /readyz, and calls, find it.
        runtime.store._max_size_bytes = 64 << 20
        for conn in (runtime.store._audit_conn, runtime.store._conn):
            conn.execute("PRAGMA max_page_count = 1000000")
        async with httpx2.AsyncClient() as http:
            with anyio.fail_after(10):
                while (await http.get(f"{live.base}/readyz")).status_code != 200:
                    await anyio.sleep(0.1)
        # the refused calls never reached the plugin: this is its second run
        assert "bumped to 2" in str(await client.request("tools/call", bump))

    # A server started on a store that is full refuses from the first call on.
    again = make_runtime(data, db_max_mb=1, rate_limit=0)
    async with serve(again) as live:
        pidfile = tmp_path / "ran.pid"
        start = {"name": "faulty_daemon", "arguments": {"pidfile": str(pidfile), "then": "return"}}
        refused = await live.client(client.token).request("tools/call", start)
        assert error_of(refused)["code"] == STORAGE_FAILURE
        assert not pidfile.exists()  # the plugin did not act
        async with httpx2.AsyncClient() as http:
            assert (await http.get(f"{live.base}/readyz")).status_code == 503


async def test_an_admin_change_the_full_store_refuses_makes_calls_refused_too(
    tmp_path: Path,
) -> None:
    # A spawn whose commit failed for want of room did not mark the log failing: the next
    # call still reached its plugin (found by review)
    async with bumped_once(tmp_path / "data") as (runtime, _, client, bump):

        async def fill() -> None:  # admin changes only, until one does not fit
            for i in range(100_000):
                await runtime.agents.spawn(f"filler-{i}", ["faulty"], {"pad": "x" * 2000})

        with anyio.fail_after(120), pytest.raises(StorageError):
            await fill()
        assert not runtime.audit.writable()
        refused = await client.request("tools/call", bump)
        assert error_of(refused)["code"] == STORAGE_FAILURE
        # Room again: the refused call never reached the plugin, this is its second run
        runtime.store._max_size_bytes = 64 << 20
        for conn in (runtime.store._audit_conn, runtime.store._conn):
            conn.execute("PRAGMA max_page_count = 1000000")
        with anyio.fail_after(10):
            while not runtime.audit.writable():
                await anyio.sleep(0.1)
        assert "bumped to 2" in str(await client.request("tools/call", bump))
