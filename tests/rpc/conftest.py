"""Fixtures of the MCP transport tests (helpers live in rpc_live.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    # module scope: a module may share one live server between its tests
    return "asyncio"
