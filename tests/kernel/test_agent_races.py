"""Agent changes against a plugin remove made at the same time by another connection (as by
``mcp0 plugin remove`` beside a server): whatever the order, a removed plugin is attached to
no one (docs/cli.md), and a change writes over nothing it did not change."""

from __future__ import annotations

import linecache
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from mcp_zero.errors import Conflict, PluginNotFound
from mcp_zero.runtime import Runtime
from mcp_zero.storage import SqliteStore

pytestmark = pytest.mark.anyio
TESTS_DIR = Path(__file__).parents[1]
FAULTY_DIR = TESTS_DIR / "plugins" / "faulty"
NOTES_DIR = TESTS_DIR.parent / "src" / "mcp_zero" / "examples" / "plugins" / "notes"
WAIT_S = 20.0


@pytest.fixture
def runtime(make_runtime: Any) -> Runtime:
    rt: Runtime = make_runtime()
    rt.plugins.install(NOTES_DIR)
    rt.plugins.install(FAULTY_DIR)
    return rt


def _another_waits_for_the_write_lock() -> bool:
    """Whether a thread other than this one is waiting for the write lock: in the store's
    ``BEGIN IMMEDIATE`` or between its tries (the change runs in a thread of its own, so
    the loop serves calls meanwhile)."""
    me = threading.get_ident()
    return any(
        frame.f_code.co_name == "_begin"
        and re.search(
            r"BEGIN IMMEDIATE|waiting: write lock",
            linecache.getline(frame.f_code.co_filename, frame.f_lineno),
        )
        for thread, frame in sys._current_frames().items()
        if thread != me
    )


async def while_another_writes(
    runtime: Runtime, write: Callable[[SqliteStore], Any], change: Callable[[], Awaitable[Any]]
) -> Any:
    """Run ``change`` while another connection (a store of its own on the same file, as
    another process has) makes ``write``: it writes (uncommitted, so ``change`` still reads
    the store as it was) and holds the write lock until ``change`` waits for it, then
    commits. So the other write commits after whatever ``change`` reads before it takes
    the lock, and before ``change`` writes. Returns what ``change`` returns or raises."""
    holding, failed = threading.Event(), []

    def write_and_commit_once_the_change_waits() -> None:
        other = SqliteStore(runtime.store.path)
        try:

            def commit_once_the_change_waits(_: Any) -> list[Any]:
                holding.set()
                deadline = time.monotonic() + WAIT_S
                while not _another_waits_for_the_write_lock():
                    if time.monotonic() > deadline:
                        raise TimeoutError("the change never waited for the write lock")
                    time.sleep(0.001)
                return []  # (its audit record is not what these tests are about)

            other.append_audit_with(lambda: write(other), commit_once_the_change_waits)
        except BaseException as exc:
            failed.append(exc)
            holding.set()
        finally:
            other.close()

    writer = threading.Thread(target=write_and_commit_once_the_change_waits)
    writer.start()
    try:
        assert holding.wait(WAIT_S)
        try:
            return await change()
        except Exception as exc:
            return exc
    finally:
        writer.join(WAIT_S)
        assert not writer.is_alive()
        assert not failed, failed


async def remove_while(runtime: Runtime, plugin: str, change: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``change`` while another connection removes ``plugin`` (see while_another_writes)."""
    outcome = await while_another_writes(runtime, lambda other: other.delete_plugin(plugin), change)
    assert runtime.store.get_plugin(plugin) is None
    return outcome


def attached_to(runtime: Runtime, plugin: str) -> list[str]:
    return [a.name for a in runtime.store.list_agents() if plugin in a.plugins]


async def test_attaching_a_plugin_while_it_is_removed_leaves_it_attached_to_no_one(
    runtime: Runtime,
) -> None:
    await runtime.agents.spawn("victim", ["notes"])
    outcome = await remove_while(
        runtime, "faulty", lambda: runtime.agents.attach("victim", "faulty")
    )
    assert isinstance(outcome, PluginNotFound)
    assert attached_to(runtime, "faulty") == []
    runtime.plugins.install(FAULTY_DIR)  # a plugin installed later under the name
    assert runtime.agents.get("victim").plugins == ["notes"]


async def test_attaching_while_another_plugin_is_removed_does_not_attach_it_again(
    runtime: Runtime,
) -> None:
    await runtime.agents.spawn("victim", ["notes"])
    attached = await remove_while(
        runtime, "notes", lambda: runtime.agents.attach("victim", "faulty")
    )
    assert attached.plugins == ["faulty"]
    assert runtime.agents.get("victim").plugins == ["faulty"]


async def test_terminating_while_a_plugin_is_removed_does_not_attach_it_again(
    runtime: Runtime,
) -> None:
    await runtime.agents.spawn("victim", ["notes", "faulty"])
    terminated = await remove_while(runtime, "notes", lambda: runtime.agents.terminate("victim"))
    assert terminated.status == "terminated"
    stored = runtime.agents.get("victim")
    assert (stored.status, stored.plugins) == ("terminated", ["faulty"])


async def test_recovering_while_a_plugin_is_removed_leaves_it_out(runtime: Runtime) -> None:
    await runtime.agents.spawn("victim", ["notes", "faulty"])
    snap = await runtime.agents.snapshot("victim")
    await runtime.agents.terminate("victim")
    recovery = await remove_while(runtime, "notes", lambda: runtime.agents.recover(snap.id))
    assert recovery.agent.plugins == ["faulty"]
    assert recovery.not_restored == {"notes": "it is not installed any more"}
    assert runtime.agents.get("victim").plugins == ["faulty"]
    bodies = [orjson.loads(e.body) for e in runtime.store.read_audit(0, 10_000)]
    [record] = [r for r in bodies if r["verb"] == "recover_agent"]
    assert record["not_restored"] == [{"plugin": "notes", "reason": "it is not installed any more"}]


async def test_recovering_a_terminated_snapshot_while_another_revives_the_agent_is_refused(
    runtime: Runtime,
) -> None:
    # Its terminate is decided only if the agent is active when the recover is decided: one
    # made active after that is not terminated undecided
    await runtime.agents.spawn("victim", ["notes"])
    await runtime.agents.terminate("victim")
    snap = await runtime.agents.snapshot("victim")

    def revive(other: SqliteStore) -> None:  # as another process's recover writes it
        other.change_agent("victim", lambda agent: setattr(agent, "status", "active"))

    outcome = await while_another_writes(runtime, revive, lambda: runtime.agents.recover(snap.id))
    assert isinstance(outcome, Conflict)
    assert "recovered by another process meanwhile" in str(outcome)
    assert runtime.agents.get("victim").status == "active"
    bodies = [orjson.loads(e.body) for e in runtime.store.read_audit(0, 10_000)]
    assert [r["verb"] for r in bodies if r["verb"] == "recover_agent"] == []


async def test_spawning_with_a_plugin_while_it_is_removed_spawns_nothing(
    runtime: Runtime,
) -> None:
    outcome = await remove_while(
        runtime, "notes", lambda: runtime.agents.spawn("newcomer", ["faulty", "notes"])
    )
    assert isinstance(outcome, PluginNotFound)
    assert runtime.store.get_agent("newcomer") is None


async def test_two_attaches_at_once_keep_both_plugins(runtime: Runtime) -> None:
    await runtime.agents.spawn("victim", [])

    def attach_notes(other: SqliteStore) -> None:  # as another process's attach writes it
        other.change_agent("victim", lambda agent: agent.plugins.append("notes"))

    attached = await while_another_writes(
        runtime, attach_notes, lambda: runtime.agents.attach("victim", "faulty")
    )
    assert attached.plugins == ["notes", "faulty"]
    assert runtime.agents.get("victim").plugins == ["notes", "faulty"]


async def test_a_snapshot_taken_while_the_agent_changes_stores_it_as_its_record_places_it(
    runtime: Runtime,
) -> None:
    # Read before its transaction, a snapshot recorded after a terminate stored the agent
    # active: recovering it, the newest, gave the terminated agent's token back (found by
    # review)
    await runtime.agents.spawn("victim", ["notes"])

    def attach_and_terminate(other: SqliteStore) -> None:  # as another process's change
        def change(agent: Any) -> None:
            agent.plugins.append("faulty")
            agent.status = "terminated"

        other.change_agent("victim", change)

    snap = await while_another_writes(
        runtime, attach_and_terminate, lambda: runtime.agents.snapshot("victim")
    )
    assert (snap.data["status"], snap.data["plugins"]) == ("terminated", ["notes", "faulty"])
    assert set(snap.data["plugin_copies"]) == {"notes", "faulty"}
    assert runtime.store.get_snapshot(snap.id) == snap
    bodies = [orjson.loads(e.body) for e in runtime.store.read_audit(0, 10_000)]
    [record] = [r for r in bodies if r["verb"] == "snapshot_agent"]
    assert record["snapshot_id"] == snap.id
