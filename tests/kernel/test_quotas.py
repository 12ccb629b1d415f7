"""Concurrency quotas: calls over a limit fail at once, slots come back on every exit."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import pytest

from mcp_zero.errors import QuotaExceeded
from mcp_zero.kernel.quotas import QuotaGate


@pytest.fixture
def anyio_backend() -> str:
    # Module-level so this file does not claim tests/kernel/conftest.py.
    return "asyncio"


@contextlib.asynccontextmanager
async def admit(
    gate: QuotaGate,
    agent: str,
    plugin: str | None = None,
    *,
    plugin_concurrency: int | None = None,
    agent_concurrency: int | None = None,
) -> AsyncIterator[None]:
    """One call's slot, as the kernel takes and gives it back."""
    gate.enter(agent, plugin, agent_concurrency, plugin_concurrency)
    try:
        yield
    finally:
        gate.leave(agent, plugin)


async def hold(
    gate: QuotaGate,
    agent: str,
    plugin: str | None,
    release: anyio.Event,
    started: list[str],
    plugin_concurrency: int | None = None,
) -> None:
    async with admit(gate, agent, plugin, plugin_concurrency=plugin_concurrency):
        started.append(agent)
        await release.wait()


@pytest.mark.anyio
async def test_agent_over_its_concurrency_is_refused_at_once() -> None:
    gate = QuotaGate()
    release = anyio.Event()
    started: list[str] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(16):
                tg.start_soon(hold, gate, "bob", "notes", release, started)
            while len(started) < 16:
                await anyio.sleep(0)
            assert gate.inflight("bob") == 16
            with pytest.raises(QuotaExceeded) as caught:
                async with admit(gate, "bob", "notes"):
                    pytest.fail("the 17th call must not run")
            err = caught.value
            assert "limit of 16" in err.message
            assert "max_concurrency" in err.message
            assert err.data == {"scope": "agent", "agent": "bob", "limit": 16}
            assert err.code == "quota_exceeded"
            # Another agent is not held back by bob's calls.
            async with admit(gate, "alice", "notes"):
                assert gate.inflight("alice") == 1
            release.set()
    assert gate.inflight("bob") == 0
    assert gate.total_inflight == 0
    async with admit(gate, "bob", "notes"):
        assert gate.inflight("bob") == 1


@pytest.mark.anyio
async def test_plugin_max_concurrency_is_shared_by_agents() -> None:
    gate = QuotaGate()
    release = anyio.Event()
    started: list[str] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold, gate, "a", "ocr", release, started, 2)
            tg.start_soon(hold, gate, "b", "ocr", release, started, 2)
            while len(started) < 2:
                await anyio.sleep(0)
            with pytest.raises(QuotaExceeded, match='plugin "ocr" already runs 2 calls') as caught:
                async with admit(gate, "c", "ocr", plugin_concurrency=2):
                    pytest.fail("over the plugin's limit")
            assert caught.value.data == {"scope": "plugin", "plugin": "ocr", "limit": 2}
            # The refused call took no agent slot.
            assert gate.inflight("c") == 0
            # Another plugin is unaffected.
            async with admit(gate, "c", "mail", plugin_concurrency=2):
                assert gate.plugin_inflight("mail") == 1
            release.set()
    assert gate.plugin_inflight("ocr") == 0


@pytest.mark.anyio
async def test_per_agent_limit_overrides_the_default() -> None:
    gate = QuotaGate(agent_concurrency=1)
    async with admit(gate, "batch", agent_concurrency=3), admit(gate, "batch", agent_concurrency=3):
        assert gate.inflight("batch") == 2
    async with admit(gate, "x"):
        with pytest.raises(QuotaExceeded, match="limit of 1"):
            async with admit(gate, "x"):
                pass


@pytest.mark.anyio
async def test_slot_is_freed_by_an_exception_and_by_cancellation() -> None:
    gate = QuotaGate(agent_concurrency=1)
    with pytest.raises(RuntimeError):
        async with admit(gate, "bob", "notes", plugin_concurrency=1):
            raise RuntimeError("tool failed")
    assert gate.inflight("bob") == 0
    assert gate.plugin_inflight("notes") == 0

    entered = anyio.Event()

    async def stuck() -> None:
        async with admit(gate, "bob", "notes", plugin_concurrency=1):
            entered.set()
            await anyio.sleep_forever()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(stuck)
            await entered.wait()
            assert gate.inflight("bob") == 1
            tg.cancel_scope.cancel()
    assert gate.inflight("bob") == 0
    assert gate.total_inflight == 0


@pytest.mark.parametrize(
    ("tool_ms", "plugin_ms", "expected"),
    [
        (None, None, 30.0),
        (1500, None, 1.5),
        (None, 2000, 2.0),
        (500, 2000, 0.5),
        (0, 2000, 2.0),
        (-5, None, 30.0),
        (10_000_000, None, 300.0),
        (None, 999_000, 300.0),
    ],
)
def test_timeout_resolution(tool_ms: int | None, plugin_ms: int | None, expected: float) -> None:
    assert QuotaGate().timeout_for(tool_ms, plugin_ms) == expected


def test_default_timeout_is_capped_by_the_maximum() -> None:
    gate = QuotaGate(default_timeout_s=60.0, max_timeout_s=10.0)
    assert gate.timeout_for(None, None) == 10.0


@pytest.mark.parametrize(
    "kwargs",
    [{"agent_concurrency": 0}, {"default_timeout_s": 0.0}, {"max_timeout_s": -1.0}],
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        QuotaGate(**kwargs)  # type: ignore[arg-type]
