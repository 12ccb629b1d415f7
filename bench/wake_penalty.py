"""What the same Python work costs after the process slept, against back to back.

A server paced at 1,000 calls/s sleeps between most calls; at saturation it
never does. On some machines (nested VMs here) a process woken from a short
sleep runs its next few tens of µs on cold caches, so the same call costs
several times more CPU paced than at saturation, in any server. This program
measures that factor for this machine: one chunk of work (encoding a small
dict to JSON ``--size`` times, ~30 µs hot), timed with the thread's CPU clock,
run back to back and after sleeps of 0.2, 1 and 5 ms, interleaved in rounds so
a busy moment of the machine hits every case alike.

Run: python bench/wake_penalty.py [--rounds 20] [--per-round 200] [--size 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

GAPS_MS = (0.0, 0.2, 1.0, 5.0)


def chunk(size: int) -> int:
    out = {}
    for i in range(size):
        out[str(i)] = json.dumps({"a": i, "b": [i, i + 1], "c": "text"})
    return len(out)


def one_round(gap_s: float, calls: int, size: int) -> float:
    """Median thread-CPU µs of one chunk, each chunk after a sleep of ``gap_s``."""
    costs = []
    for _ in range(calls):
        if gap_s:
            time.sleep(gap_s)
        t = time.thread_time_ns()
        chunk(size)
        costs.append((time.thread_time_ns() - t) / 1000)
    return statistics.median(costs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=200, help="chunks per case per round")
    parser.add_argument("--size", type=int, default=15, help="json.dumps calls per chunk")
    args = parser.parse_args()
    chunk(args.size)  # imports and first-call costs out of the way
    medians: dict[float, list[float]] = {gap: [] for gap in GAPS_MS}
    for _ in range(args.rounds):
        for gap in GAPS_MS:
            medians[gap].append(one_round(gap / 1000, args.per_round, args.size))
    hot = statistics.median(medians[0.0])
    print(f"{'sleep before each chunk':>24} {'µs CPU per chunk':>17} {'x back to back':>15}")
    for gap in GAPS_MS:
        cost = statistics.median(medians[gap])
        label = "none (back to back)" if gap == 0 else f"{gap:g} ms"
        print(f"{label:>24} {cost:17.1f} {cost / hot:15.2f}")


if __name__ == "__main__":
    main()
