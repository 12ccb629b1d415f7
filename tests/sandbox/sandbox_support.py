"""Shared helpers of the sandbox tests (a module, not conftest: several conftest.py files
exist in this tree and ``from conftest import`` would pick whichever was loaded first)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mcp_zero.errors import McpZeroError

KIT_DIR = Path(__file__).parent / "kit"
TESTS_DIR = Path(__file__).parent.parent
CONFORMANCE_DIR = TESTS_DIR / "plugins" / "conformance"
NOTES_DIR = Path(__file__).parents[2] / "src" / "mcp_zero" / "examples" / "plugins" / "notes"


class RecordingBridge:
    """A CallBridge that records what the tool sent (and when its handler ran on after its
    call ended, and ended) and answers requests from a table."""

    def __init__(self, answers: dict[str, dict[str, Any]] | None = None) -> None:
        self.events: list[tuple[str, Any]] = []
        self.answers = answers or {}

    async def progress(self, progress: float, total: float | None, message: str | None) -> None:
        self.events.append(("progress", (progress, total, message)))

    async def log(self, level: str, data: Any, logger: str | None) -> None:
        self.events.append(("log", (level, data, logger)))

    async def close_stream(self) -> None:
        self.events.append(("close_stream", None))

    async def resource_updated(self, uri: str) -> None:
        self.events.append(("resource_updated", uri))

    def handler_runs_on(self) -> Callable[[], None]:
        self.events.append(("handler_runs_on", None))
        return lambda: self.events.append(("handler_ended", None))

    async def request(
        self, method: str, params: dict[str, Any], key: str | None = None
    ) -> dict[str, Any]:
        self.events.append(("request", (method, params)))
        if method not in self.answers:
            raise McpZeroError(f"client does not support {method}")
        return self.answers[method]
