"""A plugin whose results and errors carry secrets, for the tests of ``@redact``."""

from __future__ import annotations

from typing import Any

from mcp_zero.plugin import Context, NotFoundError, Plugin, ToolError

plugin = Plugin("leaky")
KEY = "AKIAIOSFODNN7EXAMPLE"


@plugin.tool("leaky_keys")
def keys(ctx: Context) -> dict[str, Any]:
    return {"aws": KEY, "password": "hunter22 and more", "db": {"token": "s3cr3t-t0ken"}}


@plugin.tool("leaky_bulk")
def bulk(ctx: Context, mib: int) -> str:
    """``mib`` MiB of text with a secret on each ~100 characters, announced by a log message
    before it is made (the call holds the plugin's one slot from then on)."""
    ctx.log("info", "making the bulk")
    line = f"row of a large report, its key is {KEY}; password=hunter22 and some more text\n"
    return line * ((mib << 20) // len(line))


@plugin.resource("leaky://broken", mime_type="text/plain")
def broken(ctx: Context) -> str:
    raise ValueError(f"could not parse config: aws_key={KEY}")


@plugin.resource("leaky://broken/bulk", mime_type="text/plain")
def broken_bulk(ctx: Context) -> str:
    raise ValueError(f"could not parse config: aws_key={KEY} " * 40_000)  # ~1.5 MiB


@plugin.resource_template("leaky://item/{id}", mime_type="text/plain")
def item(ctx: Context, id: str) -> str:
    raise NotFoundError(f"no item; the key is {KEY}")


@plugin.prompt("leaky_prompt")
def prompt(ctx: Context, a: str) -> str:
    raise ToolError(f"bad argument, password=hunter22 and {KEY}")


@plugin.completion(prompt="leaky_prompt", argument="a")
def complete(ctx: Context, value: str, arguments: dict[str, str]) -> list[str]:
    raise RuntimeError(f"completion broke: {KEY}")
