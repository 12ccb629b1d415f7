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
    directory.mkdir(parents=True)
    (directory / "plugin.json").write_text(
        json.dumps(
            {
                "name": name,
                "version": "1.0.0",
                "abi": 1,
                "entry": f"{name}_plugin:plugin",
                "tools": [
                    {
                        "name": f"{name}_echo",
                        "description": "never",
                        "inputSchema": {"type": "object"},
                    }
                ],
            }
        )
    )
    (directory / f"{name}_plugin.py").write_text(
        "import os, pathlib, time\n"
        f"pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))\n"
        "time.sleep(1000)\n"
    )
    return directory
