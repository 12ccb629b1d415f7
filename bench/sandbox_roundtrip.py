"""Process-runtime cost: worker cold start and the round trip of a trivial tool call.

Baseline, measured in the same run: a bare line-echo child process behind the same
kind of asyncio subprocess pipes (the floor any worker protocol sits on).
Run: .venv/bin/python bench/sandbox_roundtrip.py [N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from mcp_zero.sandbox.manifest import load_manifest
from mcp_zero.sandbox.process import ProcessRuntime

PLUGIN = Path(__file__).parent.parent / "tests" / "sandbox" / "kit"
ECHO = (
    "import sys\n"
    "for line in sys.stdin.buffer:\n"
    "    sys.stdout.buffer.write(line); sys.stdout.flush()\n"
)


class Bridge:
    async def progress(self, *a: Any) -> None: ...
    async def log(self, *a: Any) -> None: ...
    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        return {}


class _Echo(asyncio.SubprocessProtocol):
    def __init__(self) -> None:
        self.waiter: asyncio.Future[bytes] | None = None

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1 and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(data)


async def baseline(n: int) -> float:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.subprocess_exec(_Echo, sys.executable, "-c", ECHO)
    stdin = transport.get_pipe_transport(0)
    line = b'{"id":1,"op":"call_tool","name":"echo","arguments":{"text":"x"},"agent":"a"}\n'
    started = time.perf_counter()
    for _ in range(n):
        proto.waiter = loop.create_future()
        stdin.write(line)  # type: ignore[attr-defined]
        await proto.waiter
    elapsed = (time.perf_counter() - started) / n
    transport.close()
    return elapsed


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        manifest = load_manifest(PLUGIN)
        starts = []
        for i in range(5):
            rt = ProcessRuntime(manifest, PLUGIN, Path(tmp) / f"d{i}")
            t = time.perf_counter()
            await rt.start()
            starts.append(time.perf_counter() - t)
            await rt.close()
        rt = ProcessRuntime(manifest, PLUGIN, Path(tmp) / "d")
        await rt.start()
        bridge = Bridge()
        floor = await baseline(n)
        print(f"baseline pipe echo round trip: {floor * 1e6:7.1f} us")
        print(f"cold start (median of 5):      {statistics.median(starts) * 1e3:7.1f} ms")
        for tool in ("aecho", "echo"):
            await rt.call_tool(tool, {}, agent="a", bridge=bridge, timeout=5)
            t = time.perf_counter()
            for _ in range(n):
                await rt.call_tool(tool, {"text": "x"}, agent="a", bridge=bridge, timeout=5)
            per = (time.perf_counter() - t) / n
            kind = "async" if tool == "aecho" else "sync "
            ratio = per / floor
            print(f"{kind} tool round trip:         {per * 1e6:7.1f} us  ({ratio:.2f}x baseline)")
        await rt.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("calls", type=int, nargs="?", default=5000, help="per measurement")
    uvloop.run(main(parser.parse_args().calls))
