"""Plugins the tests build in a temporary directory (a module of its own: test modules
anywhere under tests/ import it by this unique name; tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import json
from pathlib import Path


def loading_plugin(directory: Path, pid_file: Path, *, name: str = "slow") -> Path:
    """Plugin ``name`` whose module, as it loads, writes its pid to ``pid_file`` and sleeps
    1,000 s: a plugin that hangs while it starts. Its one tool is ``<name>_echo``.

    A worker may write only its own data dir (``<data dir>/plugin-data/<name>``), so that
    is where ``pid_file`` must be."""
    _manifest(directory, name, "never", {"type": "object"})
    (directory / f"{name}_plugin.py").write_text(
        "import os, pathlib, time\n"
        f"pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))\n"
        "time.sleep(1000)\n"
    )
    return directory


def gated_plugin(directory: Path, gate: Path, *, name: str = "gated") -> Path:
    """Plugin ``name`` whose module, as it loads, waits until ``gate`` exists: a worker whose
    start the test ends. Its one tool, ``<name>_echo``, returns its ``text``. ``gate`` must be
    in the plugin's data dir (``<data dir>/plugin-data/<name>``), the one place its worker
    may see beyond its code."""
    schema = {"type": "object", "properties": {"text": {"type": "string"}}}
    _manifest(directory, name, "echoes", schema)
    (directory / f"{name}_plugin.py").write_text(
        "import os, time\n"
        "from mcp_zero.plugin import Plugin\n"
        f"while not os.path.exists({str(gate)!r}):\n"
        "    time.sleep(0.01)\n"
        f"plugin = Plugin({name!r})\n"
        f"@plugin.tool({name + '_echo'!r})\n"
        "async def echo(ctx, text=''):\n"
        "    return text\n"
    )
    return directory


def _manifest(directory: Path, name: str, description: str, schema: dict[str, object]) -> None:
    """``directory`` made, with the plugin.json of plugin ``name``: module ``<name>_plugin``,
    one tool ``<name>_echo``."""
    directory.mkdir(parents=True)
    tool = {"name": f"{name}_echo", "description": description, "inputSchema": schema}
    manifest = {
        "name": name,
        "version": "1.0.0",
        "abi": 1,
        "entry": f"{name}_plugin:plugin",
        "tools": [tool],
    }
    (directory / "plugin.json").write_text(json.dumps(manifest))
