"""Appends to an audit log forever from many coroutines; prints each seq once acknowledged.

Run by test_audit_durability.py, which kills it with SIGKILL mid-stream.
Usage: python audit_kill_target.py DB_PATH [COROUTINES]
"""

from __future__ import annotations

import asyncio
import sys

from mcp_zero.audit import AuditLog
from mcp_zero.storage import SqliteStore


async def main(path: str, coroutines: int) -> None:
    store = SqliteStore(path)
    log = AuditLog(store)
    log.start()
    out = sys.stdout

    async def appender(worker: int) -> None:
        n = 0
        while True:
            entry = await log.append({"agent": f"w{worker}", "verb": "call_tool", "n": n})
            # Printed only after append returned, i.e. after the entry is durable.
            out.write(f"{entry.seq}\n")
            out.flush()
            n += 1

    await asyncio.gather(*(appender(w) for w in range(coroutines)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 32))
