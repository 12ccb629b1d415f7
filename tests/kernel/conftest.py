"""Fixtures of the kernel tests: a real Runtime on tmp_path with test plugins installed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mcp_zero.config import load_settings
from mcp_zero.errors import McpZeroError
from mcp_zero.runtime import Runtime

TESTS_DIR = Path(__file__).parents[1]
FAULTY_DIR = TESTS_DIR / "plugins" / "faulty"
CONFORMANCE_DIR = TESTS_DIR / "plugins" / "conformance"
NOTES_DIR = TESTS_DIR.parent / "src" / "mcp_zero" / "examples" / "plugins" / "notes"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class KernelBridge:
    """A ClientBridge recording what a call sent to its client; answers sampling."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    async def progress(self, progress: float, total: float | None, message: str | None) -> None:
        self.events.append(("progress", progress))

    async def log(self, level: str, data: Any, logger: str | None) -> None:
        self.events.append(("log", level))

    async def close_stream(self) -> None:
        self.events.append(("close_stream", None))

    async def resource_updated(self, uri: str) -> None:
        self.events.append(("resource_updated", uri))

    async def request(
        self, method: str, params: dict[str, Any], key: str | None = None
    ) -> dict[str, Any]:
        if method != "sampling/createMessage":
            raise McpZeroError(f"{method} is not supported here")
        return {"role": "assistant", "content": {"type": "text", "text": "sampled"}, "model": "m"}


@pytest.fixture
def bridge() -> KernelBridge:
    return KernelBridge()


@pytest.fixture
def make_runtime(tmp_path: Path) -> Any:
    """Runtimes on tmp_path/<name>, closed after the test (closing twice is harmless)."""
    made: list[Runtime] = []

    def make(name: str = "data", **overrides: Any) -> Runtime:
        settings = load_settings(None, {"data_dir": tmp_path / name, **overrides}, environ={})
        runtime = Runtime(settings)
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.close()


@pytest.fixture
async def started(make_runtime: Any) -> AsyncIterator[Runtime]:
    """A started Runtime with notes, faulty and conformance installed."""
    runtime: Runtime = make_runtime()
    for plugin in (NOTES_DIR, FAULTY_DIR, CONFORMANCE_DIR):
        runtime.plugins.install(plugin)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.aclose()
