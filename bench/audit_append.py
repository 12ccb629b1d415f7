"""Audit append throughput: group commit vs one commit per event, measured in the same run.

    .venv/bin/python bench/audit_append.py [--events N] [--coroutines C] [--baseline-events M]

Every run uses AuditLog on a fresh SqliteStore (WAL, synchronous=FULL) and the
same event, appended from C coroutines. Group commit runs with the defaults
(those of ``mcp0 serve``) and with window 0 (what one loop turn submits, up to
1000 events, is a batch); the baseline sets ``max_batch=1, window=0``, so each
event is its own transaction and fsync. The baseline is slow (about 0.1 ms
per event here), so it runs over fewer events by default; rates are per event.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from mcp_zero.audit import AuditLog, verify_store
from mcp_zero.audit.log import DEFAULT_MAX_BATCH, DEFAULT_WINDOW
from mcp_zero.storage import SqliteStore

EVENT = {
    "agent": "bench",
    "anonymous": False,
    "verb": "call_tool",
    "resource": "echo",
    "plugin": "demo",
    "outcome": "allowed",
    "code": None,
    "reasons": [],
    "duration_ms": 0.42,
    "request_id": "0f8e0c1e-6a53-4a8e-9a63-1d2b9b5f0c11",
}


async def _run(log: AuditLog, events: int, coroutines: int) -> tuple[float, float]:
    per = events // coroutines
    extra = events - per * coroutines

    async def worker(count: int) -> None:
        for _ in range(count):
            await log.append(EVENT)

    cpu = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(worker(per + (1 if w < extra else 0)) for w in range(coroutines)))
    return time.perf_counter() - started, time.process_time() - cpu


def measure(
    path: Path, events: int, coroutines: int, *, window: float = 0.002, max_batch: int = 1000
) -> tuple[float, float, int]:
    """Wall seconds and CPU seconds (all threads) to append ``events``, and the batch count."""
    with SqliteStore(path) as store:
        log = AuditLog(store, window=window, max_batch=max_batch)
        log.start()
        try:
            elapsed, cpu = asyncio.run(_run(log, events, coroutines))
        finally:
            log.close()
        report = verify_store(store)
        assert report.count == events, report
        return elapsed, cpu, log.stats.batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--coroutines", type=int, default=64)
    parser.add_argument("--baseline-events", type=int, default=5_000)
    args = parser.parse_args()

    runs: list[tuple[str, int, float, float, int]] = []
    with tempfile.TemporaryDirectory(prefix="mcp0-bench-") as tmp:
        for label, events, window, max_batch in (
            (
                f"group commit ({DEFAULT_WINDOW * 1000:g} ms, {DEFAULT_MAX_BATCH})",
                args.events,
                DEFAULT_WINDOW,
                DEFAULT_MAX_BATCH,
            ),
            ("group commit (window 0)", args.events, 0.0, 1000),
            ("one commit per event", args.baseline_events, 0.0, 1),
        ):
            path = Path(tmp) / f"{len(runs)}.db"
            timing = measure(path, events, args.coroutines, window=window, max_batch=max_batch)
            runs.append((label, events, *timing))

    print(f"{args.coroutines} coroutines; CPU is the whole process (commits run on the loop)")
    print(f"{'run':<28}{'events':>8}{'batches':>9}{'events/s':>10}{'µs/event':>10}{'CPU µs':>8}")
    for label, events, wall, cpu, batches in runs:
        print(
            f"{label:<28}{events:>8}{batches:>9}{events / wall:>10.0f}"
            f"{wall / events * 1e6:>10.1f}{cpu / events * 1e6:>8.1f}"
        )
    base_wall = runs[-1][2] / runs[-1][1]
    for label, events, wall, _cpu, _batches in runs[:-1]:
        print(f"{label}: {base_wall / (wall / events):.1f}x the per-event rate of one commit each")


if __name__ == "__main__":
    main()
