"""The layering docs/architecture.md states: ``storage``, ``audit`` and ``sandbox`` know
nothing of ``rpc``, ``policy`` or ``kernel`` (the kernel composes them)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "mcp_zero"
LOWER = ("storage", "audit", "sandbox")
UPPER = ("mcp_zero.rpc", "mcp_zero.policy", "mcp_zero.kernel")


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at its top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", LOWER)
def test_a_lower_layer_imports_no_upper_one(package: str) -> None:
    # sandbox/worker.py took the stop signals from rpc (found by review)
    wrong = {
        f"{path.relative_to(SRC)}: {name}"
        for path in sorted((SRC / package).rglob("*.py"))
        for name in imported(path)
        if name.startswith(UPPER) and name.split(".")[:2] != ["mcp_zero", package]
    }
    assert not wrong
    assert list((SRC / package).rglob("*.py"))  # (the layer is where the test looks)
