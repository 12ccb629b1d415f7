"""Paced CPU of two mcp0 servers side by side: paired runs, so that the machine's drift
cancels out.

Single paced runs here swing by 5 points within an hour, more than most changes move the
figure. This starts two `mcp0 serve` (each as bench/governed_calls.py starts it: the
`echo` or `notes_add` tool, an agent, the rate limit lifted), A and B, each with its own
extra environment, and loads them in turn at the paced rate, the order alternating, for
``--rounds`` pairs. It prints each pair's CPU % (server and workers, per 1,000 calls/s)
and p50, and the medians, the paired differences and the ratio of the medians.

    .venv/bin/python bench/paced_pairs.py --a PYTHONPATH=/tmp/base/src --b '' [--rounds 8]
        [--duration 6] [--rate 1000] [--tool echo]

``--a``/``--b`` take ``NAME=VALUE[,NAME=VALUE…]``: ``PYTHONPATH=<a checkout>/src`` runs
that checkout's code (its workers too, whose PYTHONPATH is the server's package).
``--a-venv``/``--b-venv`` run another venv's ``mcp0`` (another interpreter; its workers
run on the server's interpreter).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import governed_calls as bench


def environment(spec: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in spec.split(",") if item)


def start(extra: dict[str, str], tool: str, venv: str | None) -> tuple[bench.Target, Path]:
    saved, saved_bin = dict(os.environ), bench.VENV_BIN
    os.environ.update(extra)
    if venv:
        bench.VENV_BIN = Path(venv) / "bin"
    try:
        workdir = Path(tempfile.mkdtemp(prefix="mcp0-pairs-"))
        target = bench.start_mcp0(workdir, tool)
        bench.open_session(target)
        return target, workdir
    finally:
        os.environ.clear()
        os.environ.update(saved)
        bench.VENV_BIN = saved_bin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--a", default="", help="NAME=VALUE,… for server A")
    parser.add_argument("--b", default="", help="NAME=VALUE,… for server B")
    parser.add_argument("--a-venv", help="the venv whose mcp0 server A runs (default: this one)")
    parser.add_argument("--b-venv", help="the venv whose mcp0 server B runs (default: this one)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--tool", choices=sorted(bench.TOOLS), default="echo")
    args = parser.parse_args()
    wrk = bench.ensure_wrk()
    servers = {
        "A": start(environment(args.a), args.tool, args.a_venv),
        "B": start(environment(args.b), args.tool, args.b_venv),
    }
    runs: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
    try:
        for target, workdir in servers.values():  # warm-up
            bench.run_wrk(wrk, target, workdir, 16, 2, args.rate)
        for r in range(args.rounds):
            for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
                target, workdir = servers[name]
                before = bench.cpu_seconds(target.proc.pid)[1]
                load = bench.run_wrk(wrk, target, workdir, 16, args.duration, args.rate)
                spent = bench.cpu_seconds(target.proc.pid)[1] - before
                per_1k = 100 * spent / load["seconds"] * 1000 / load["calls_per_s"]
                runs[name].append((per_1k, load["p50_ms"]))
            (a, a50), (b, b50) = runs["A"][-1], runs["B"][-1]
            print(f"pair {r}: A {a:.1f}  B {b:.1f}   (p50 ms {a50:.2f} / {b50:.2f})", flush=True)
    finally:
        for target, _ in servers.values():
            bench.stop(target.proc)
    a_median = statistics.median(cpu for cpu, _ in runs["A"])
    b_median = statistics.median(cpu for cpu, _ in runs["B"])
    differences = [b[0] - a[0] for a, b in zip(runs["A"], runs["B"], strict=True)]
    print(
        f"CPU % per 1,000 calls/s, medians: A {a_median:.1f}  B {b_median:.1f};  B - A: "
        f"median {statistics.median(differences):+.1f}, mean {statistics.mean(differences):+.1f};"
        f"  B / A {b_median / a_median:.3f}"
    )


if __name__ == "__main__":
    main()
