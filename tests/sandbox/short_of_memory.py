"""Run by test_process_runtime.py in a process of its own: start the kit plugin's worker, then
leave this process ROOM_MB of address space (RLIMIT_AS; the worker, started before, keeps
its own) and call the kit's ``huge`` tool for MB megabytes, more than that room can read.
Prints how the call ended and whether the worker that answers next is the same one.

usage: python short_of_memory.py TMP_DIR ROOM_MB MB
"""

from __future__ import annotations

import asyncio
import json
import resource
import shutil
import sys
from pathlib import Path

from sandbox_support import KIT_DIR, RecordingBridge

from mcp_zero.sandbox.manifest import load_manifest
from mcp_zero.sandbox.process import ProcessRuntime


def address_space() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


async def main(tmp: Path, room_mb: int, mb: int) -> None:
    copy = tmp / "kit"
    shutil.copytree(KIT_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    runtime = ProcessRuntime(load_manifest(copy), copy, tmp / "data")
    await runtime.start()
    out: dict[str, object] = {}
    try:

        async def call(tool: str, arguments: dict[str, object]) -> dict[str, object]:
            return await runtime.call_tool(
                tool, arguments, agent="a", bridge=RecordingBridge(), timeout=5
            )

        await call("echo", {"text": "warm"})
        pid = runtime.pids[0]
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (address_space() + (room_mb << 20), hard))
        try:
            await call("huge", {"mb": mb})
            out["huge"] = "answered"
        except Exception as exc:
            out["huge"] = f"{type(exc).__name__}: {exc}"
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        who = await call("whoami", {})
        out["same_worker"] = who["structuredContent"]["pid"] == pid  # type: ignore[index]
    finally:
        await runtime.close()
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
