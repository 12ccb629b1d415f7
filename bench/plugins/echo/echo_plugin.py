"""Benchmark plugin: ``echo`` returns its text, so a load measures the governed path itself."""

from __future__ import annotations

from mcp_zero.plugin import Context, Plugin

plugin = Plugin("echo")


@plugin.tool("echo")
async def echo(ctx: Context, text: str) -> str:
    return text
