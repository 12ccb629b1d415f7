"""Fixtures for the sandbox tests: a recording client bridge and started runtimes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sandbox_support import KIT_DIR, RecordingBridge

from mcp_zero.sandbox.manifest import load_manifest
from mcp_zero.sandbox.ownership import worker_identity
from mcp_zero.sandbox.process import ProcessRuntime


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


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


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any user may search, owned by the workers' user: pytest's tmp_path is
    under a 0700 directory, which a root server's workers (nobody) do not see at all."""
    path = Path(tempfile.mkdtemp(prefix="mcp0-open-"))
    path.chmod(0o755)
    identity = worker_identity()
    if identity is not None:
        os.chown(path, *identity)
    yield path
    shutil.rmtree(path)
