"""Fixtures for the sandbox tests: a recording client bridge and started runtimes."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from mcp_zero.errors import McpZeroError
from mcp_zero.sandbox.manifest import load_manifest
from mcp_zero.sandbox.process import ProcessRuntime

KIT_DIR = Path(__file__).parent / "kit"
TESTS_DIR = Path(__file__).parent.parent
CONFORMANCE_DIR = TESTS_DIR / "plugins" / "conformance"
NOTES_DIR = Path(__file__).parents[2] / "src" / "mcp_zero" / "examples" / "plugins" / "notes"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class RecordingBridge:
    """A ClientBridge that records what the tool sent and answers requests from a table."""

    def __init__(self, answers: dict[str, dict[str, Any]] | None = None) -> None:
        self.events: list[tuple[str, Any]] = []
        self.answers = answers or {}

    async def progress(self, progress: float, total: float | None, message: str | None) -> None:
        self.events.append(("progress", (progress, total, message)))

    async def log(self, level: str, data: Any, logger: str | None) -> None:
        self.events.append(("log", (level, data, logger)))

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.events.append(("request", (method, params)))
        if method not in self.answers:
            raise McpZeroError(f"client does not support {method}")
        return self.answers[method]


@pytest.fixture
def bridge() -> RecordingBridge:
    return RecordingBridge()


RuntimeFactory = Callable[..., Any]


@pytest.fixture
async def make_runtime(tmp_path: Path) -> AsyncIterator[RuntimeFactory]:
    """Start a ProcessRuntime for a plugin dir (copied, so tests may edit it); closed after."""
    started: list[ProcessRuntime] = []

    async def make(plugin_dir: Path = KIT_DIR, **kwargs: Any) -> ProcessRuntime:
        copy = tmp_path / f"plugin{len(started)}"
        shutil.copytree(plugin_dir, copy, ignore=shutil.ignore_patterns("__pycache__"))
        runtime = ProcessRuntime(
            load_manifest(copy), copy, tmp_path / f"data{len(started)}", **kwargs
        )
        started.append(runtime)
        await runtime.start()
        return runtime

    yield make
    for runtime in started:
        await runtime.close()
