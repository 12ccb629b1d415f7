"""Where a governed call's server time goes, paced against saturation, by Python function.

`governed_calls.py` says a paced call costs ~3x its saturated cost; this says where. It
starts `mcp0 serve` as `governed_calls.py` does (echo plugin, one agent, rate limit off)
and samples the server with py-spy (not a dependency: `pip install py-spy`; --py-spy
names the binary) in its non-blocking mode, which reads the server's memory from
outside and never stops it, while wrk drives it paced (1,000 calls/s over 16
connections) and then at saturation (32 connections). Each sample is one moment of
the server's main thread on a CPU; a function's share of the samples times the server's
CPU per call (from /proc, over the same load) is its inclusive µs per call.

"outside Python frames" is the time in which the thread ran no Python code of its own:
the event loop's C code (uvloop, libuv) and the kernel under it, polling, waking and
reading sockets.

Run: python bench/paced_profile.py [--seconds 15] [--top 30] [--py-spy PATH]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import governed_calls as bench

LOOP_FRAMES = ("Runner.run", "run_until_complete", "BaseEventLoop.")


def sample(spy: str, pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    command = [spy, "record", "--nonblocking", "--rate", "1000", "--format", "raw"]
    command += ["--output", str(out), "--pid", str(pid), "--duration", str(int(seconds) + 2)]
    return subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def frame_name(frame: str) -> str:
    """``_post (mcp_zero/rpc/http.py:650)`` → ``_post (http.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1].split(':', 1)[0]})" if where else name


def inclusive(path: Path) -> tuple[collections.Counter[str], int]:
    """Samples per function (each function once per sample) and the samples in all."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():  # (a line py-spy cut short)
            continue
        samples = int(n)
        total += samples
        frames = [frame_name(f) for f in stack.split(";")]
        for name in set(frames):
            counts[name] += samples
        if frames and frames[-1].startswith(LOOP_FRAMES):
            counts["(outside Python frames)"] += samples
    return counts, total


def phase(
    spy: str,
    wrk: str,
    target: bench.Target,
    workdir: Path,
    name: str,
    conns: int,
    rate: float,
    seconds: float,
) -> tuple[collections.Counter[str], int, float]:
    out = workdir / f"spy-{name}.txt"
    spying = sample(spy, target.proc.pid, seconds, out)
    time.sleep(1.0)  # (py-spy attached)
    before = bench.cpu_seconds(target.proc.pid)[0]
    load = bench.run_wrk(wrk, target, workdir, conns, seconds, rate)
    spent = bench.cpu_seconds(target.proc.pid)[0] - before
    spying.wait()
    us_per_call = 1e6 * spent / (load["calls_per_s"] * load["seconds"])
    counts, total = inclusive(out)
    print(
        f"{name}: {load['calls_per_s']:,.0f} calls/s, server {us_per_call:.1f} µs CPU per "
        f"call, {total:,} samples",
        flush=True,
    )
    return counts, total, us_per_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "")
    args = parser.parse_args()
    if not args.py_spy:
        sys.exit("py-spy not found: pip install py-spy (or --py-spy PATH)")
    wrk = bench.ensure_wrk()
    workdir = Path(tempfile.mkdtemp(prefix="mcp0-profile-"))
    target = bench.start_mcp0(workdir, "echo")
    try:
        bench.open_session(target)
        bench.run_wrk(wrk, target, workdir, 16, 3, 1000)  # warm-up
        paced = phase(args.py_spy, wrk, target, workdir, "paced", 16, 1000, args.seconds)
        saturated = phase(args.py_spy, wrk, target, workdir, "saturation", 32, 0, args.seconds)
    finally:
        bench.stop(target.proc)
    (p_counts, p_total, p_us), (s_counts, s_total, s_us) = paced, saturated
    print(f"\n{'µs/call paced':>14} {'saturated':>10} {'ratio':>6}  function (inclusive)")
    skip = ("<module>", "Command.", "Context.", "Group.", "_Main.", "_errors.", "serve (", "run_")
    shown = 0
    for name, n in p_counts.most_common():
        if name.startswith(skip) or name.startswith(LOOP_FRAMES[:2]):
            continue
        a = p_us * n / p_total
        b = s_us * s_counts.get(name, 0) / s_total
        print(f"{a:14.1f} {b:10.1f} {a / b if b else float('nan'):6.1f}  {name}")
        shown += 1
        if shown == args.top:
            break


if __name__ == "__main__":
    main()
