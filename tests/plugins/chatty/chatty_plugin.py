"""A plugin that floods its client: many progress steps or many large log messages, as fast as
it can (flow control and the resumption buffer's bounds are tested with it)."""

import asyncio

from mcp_zero.plugin import Context, Plugin

plugin = Plugin("chatty")


@plugin.tool("chatty_progress")
async def progress(ctx: Context, steps: int) -> str:
    for step in range(1, steps + 1):
        ctx.progress(step, steps)
        if step % 50 == 0:
            await asyncio.sleep(0)
    return f"done {steps}"


@plugin.tool("chatty_logs")
async def chatty_logs(ctx: Context, n: int, size: int) -> str:
    for i in range(n):
        ctx.log("info", {"i": i, "pad": "x" * size})
        if i % 50 == 0:
            await asyncio.sleep(0)
    return f"logged {n}"
