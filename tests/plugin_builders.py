"""Plugins the tests build in a temporary directory (a module of its own: test modules
anywhere under tests/ import it by this unique name; tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def loading_plugin(directory: Path, pid_file: Path, *, name: str = "slow") -> Path:
    """Plugin ``name`` whose module, as it loads, writes its pid to ``pid_file`` and sleeps
    1,000 s: a plugin that hangs while it starts. Its one tool is ``<name>_echo``.

    A worker may write only its own data dir (``<data dir>/plugin-data/<name>``), so that
    is where ``pid_file`` must be."""
    code = (
        "import os, pathlib, time\n"
        f"pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))\n"
        "time.sleep(1000)\n"
    )
    tool = {"name": f"{name}_echo", "description": "never", "inputSchema": {"type": "object"}}
    return write_plugin(directory, name, code, [tool])


def gated_plugin(directory: Path, gate: Path, *, name: str = "gated") -> Path:
    """Plugin ``name`` whose module, as it loads, waits until ``gate`` exists: a worker whose
    start the test ends. Its one tool, ``<name>_echo``, returns its ``text``. ``gate`` must be
    in the plugin's data dir (``<data dir>/plugin-data/<name>``), the one place its worker
    may see beyond its code."""
    code = (
        "import os, time\n"
        "from mcp_zero.plugin import Plugin\n"
        f"while not os.path.exists({str(gate)!r}):\n"
        "    time.sleep(0.01)\n"
        f"plugin = Plugin({name!r})\n"
        f"@plugin.tool({name + '_echo'!r})\n"
        "async def echo(ctx, text=''):\n"
        "    return text\n"
    )
    schema = {"type": "object", "properties": {"text": {"type": "string"}}}
    tool = {"name": f"{name}_echo", "description": "echoes", "inputSchema": schema}
    return write_plugin(directory, name, code, [tool])


def write_plugin(
    directory: Path,
    name: str,
    code: str,
    tools: Iterable[str | dict[str, Any]] = (),
    **manifest: Any,
) -> Path:
    """Plugin ``name`` made in ``directory``: module ``<name>_plugin`` of ``code``, and a
    plugin.json listing ``tools`` (a name: described by itself, taking any object; or the
    whole entry) with the rest of ``manifest`` (which may replace the version, 1.0.0)."""
    directory.mkdir(parents=True)
    (directory / f"{name}_plugin.py").write_text(code)
    listed = [
        t
        if isinstance(t, dict)
        else {"name": t, "description": t, "inputSchema": {"type": "object"}}
        for t in tools
    ]
    written = {"name": name, "version": "1.0.0", "abi": 1, "entry": f"{name}_plugin:plugin"}
    (directory / "plugin.json").write_text(json.dumps({**written, "tools": listed, **manifest}))
    return directory


# Each tool writes a frame of its own for its call to the worker's protocol pipe, as only
# code past the plugin API can, then returns: the worker's own answer comes after it.
_FORGING = """\
import os
from mcp_zero.plugin import Plugin, image

plugin = Plugin("forger")


def forge(ctx, body):
    os.write(ctx._channel._out_fd, body % ctx._call_id + b"\\n")


@plugin.tool("deep")
def deep(ctx, depth):
    nested = b"[" * depth + b"]" * depth
    forge(ctx, b'{"id":%d,"result":{"content":[],"structuredContent":{"x":' + nested + b"}}}")
    return "late"


@plugin.tool("many")
def many(ctx, n):
    items = b"{}," * (n - 1) + b"{}"
    forge(ctx, b'{"id":%d,"result":{"content":[],"structuredContent":{"x":[' + items + b"]}}}")
    return "late"


@plugin.tool("strays")
def strays(ctx, kind, mb, count):
    data = b"y" * (mb << 20)
    if kind == "answer":
        frame = b'{"id":987654,"result":{"x":"' + data + b'"}}\\n'
    elif kind == "not_json":
        frame = b'{"id":987654,"result":' + data + b"}\\n"
    else:
        frame = b'{"op":"log","call":%d,"level":"info","data":"' % ctx._call_id + data + b'"}\\n'
    for _ in range(count):
        os.write(ctx._channel._out_fd, frame)
    return "strayed"


@plugin.tool("text")
def text(ctx, mb):
    line = 'he said "a, b: {c} [d]" \\\\ then left,\\n'
    return (line * ((mb << 20) // len(line) + 1))[: mb << 20]


@plugin.tool("blob")
def blob(ctx, mb):
    return image(os.urandom(mb << 20), "image/png")
"""


def forging_plugin(directory: Path) -> Path:
    """Plugin ``forger``, whose tools write frames the plugin API never would to their
    worker's pipe (a plugin is untrusted code): ``deep(depth)`` answers its call with a
    result whose ``structuredContent.x`` is lists nested ``depth`` deep (the frame nests
    three levels more); ``many(n)`` with one whose ``x`` is ``n`` empty objects;
    ``strays(kind, mb, count)`` writes ``count`` frames of ``mb`` MiB: answers to a call
    that does not exist (``kind`` "answer"; "not_json": not JSON either) or logs of its own
    call (``"log"``). And two
    that keep to the API: ``text(mb)`` returns ``mb`` MiB of text full of commas, colons,
    brackets, quotes and backslashes; ``blob(mb)`` an image of ``mb`` MiB."""
    tools = ["deep", "many", "strays", "text", "blob"]
    return write_plugin(directory, "forger", _FORGING, tools, quotas={"memory_mb": 512})


_ASKING = """\
import asyncio
from mcp_zero.plugin import ClientRequestError, Plugin

plugin = Plugin("asker")


def tally(outcomes):
    refused = [str(o) for o in outcomes if isinstance(o, ClientRequestError)]
    return {"answered": len(outcomes) - len(refused), "refused": sorted(set(refused))}


@plugin.tool("ask_in_turn")
async def ask_in_turn(ctx, n, method="roots/list"):
    outcomes = []
    for _ in range(n):
        try:
            outcomes.append(await ctx.request(method, {}))
        except ClientRequestError as exc:
            outcomes.append(exc)
    return tally(outcomes)


@plugin.tool("ask_at_once")
async def ask_at_once(ctx, n, method="roots/list"):
    def told(task):
        if not task.cancelled() and task.exception() is not None:
            ctx.log("info", "refused")

    asked = [asyncio.ensure_future(ctx.request(method, {})) for _ in range(n)]
    for task in asked:
        task.add_done_callback(told)
    return tally(await asyncio.gather(*asked, return_exceptions=True))
"""


def asking_plugin(directory: Path) -> Path:
    """Plugin ``asker``, whose tools ``ask_in_turn(n, method="roots/list")`` and
    ``ask_at_once(n, method=...)`` make ``n`` requests of their client, one after the other
    or all at once, and return ``{"answered": N, "refused": [distinct messages]}``;
    ``ask_at_once`` logs ``refused`` (info) as each request is refused."""
    return write_plugin(directory, "asker", _ASKING, ["ask_in_turn", "ask_at_once"])
