"""A plugin that misbehaves on request, for the tests of the governed path over MCP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time

from mcp_zero.plugin import Context, Plugin

plugin = Plugin("faulty")


@plugin.tool("faulty_echo")
def echo(ctx: Context, text: str) -> str:
    return text


@plugin.tool("faulty_crash")
def crash(ctx: Context) -> str:
    # what another agent's call might have left in the shared worker's stderr
    print("a secret of another call", file=sys.stderr, flush=True)
    os._exit(3)


@plugin.tool("faulty_hang")
def hang(ctx: Context) -> str:
    time.sleep(3600)  # a thread ignores cancellation: only killing the worker stops it
    return "never"


@plugin.tool("faulty_raise")
def raise_(ctx: Context) -> str:
    raise RuntimeError("faulty plugin raised on purpose")


@plugin.tool("faulty_nap")
async def nap(ctx: Context, seconds: float) -> str:
    await asyncio.sleep(seconds)
    return f"napped {seconds}"


@plugin.tool("faulty_progress")
async def progress(ctx: Context, steps: int, pause: float = 0.01) -> str:
    for step in range(1, steps + 1):
        ctx.progress(step, steps, f"step {step}")
        await asyncio.sleep(pause)
    return f"done {steps} steps"


@plugin.tool("faulty_ask_between")
async def ask_between(ctx: Context) -> str:
    """Progress and a warning before and after a question to the client."""
    ctx.progress(1, 2, "before")
    ctx.log("warning", "before the question", "faulty")
    answer = await ctx.elicit("go on?", {"type": "object", "properties": {}})
    ctx.progress(2, 2, "after")
    ctx.log("warning", "after the question", "faulty")
    return f"answered {answer.get('action')}"


@plugin.tool("faulty_ask_then_answer")
async def ask_then_answer(ctx: Context, size: int, patience: float) -> str:
    """Asks the client, gives up on the answer after ``patience`` s, returns ``size`` bytes."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ctx.elicit("go on?", {"type": "object", "properties": {}}), patience)
    return "x" * size


@plugin.tool("faulty_started_then_wait")
async def started_then_wait(ctx: Context) -> str:
    ctx.progress(1, None, "started")
    await asyncio.sleep(3600)
    return "never"


@plugin.tool("faulty_close_then_finish")
async def close_then_finish(ctx: Context) -> str:
    ctx.close_stream()
    await asyncio.sleep(0.05)
    ctx.progress(1, 1, "after the close")
    return "finished after the close"


# Run by a child of the worker, which exits at once: the sleeper it starts is orphaned —
# in a session of its own if "detach", else in the worker's process group (as `cmd &` of a
# shell) — and holds none of the worker's pipes; with "clean", nor any of its environment.
_DAEMONIZE = (
    "import subprocess, sys\n"
    "nap = f'import time; time.sleep({float(sys.argv[3])})'\n"
    "sleeper = subprocess.Popen([sys.executable, '-c', nap],"
    " start_new_session=sys.argv[2] == 'detach', stdin=subprocess.DEVNULL,"
    " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,"
    " env={} if sys.argv[4] == 'clean' else None)\n"
    "open(sys.argv[1], 'w').write(str(sleeper.pid))\n"
)


@plugin.tool("faulty_daemon")
def daemon(
    ctx: Context,
    pidfile: str,
    then: str,
    detach: bool = False,
    seconds: float = 600,
    clean_env: bool = False,
) -> str:
    session = "detach" if detach else "stay"
    environment = "clean" if clean_env else "inherited"
    subprocess.run(
        [sys.executable, "-c", _DAEMONIZE, pidfile, session, str(seconds), environment],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=10,
    )
    if then == "crash":
        os._exit(5)
    if then == "hang":
        time.sleep(3600)
    return "daemon started"


# A daemon that outruns a walk of its tree: in a session of its own, each generation forks
# the next and exits at once; every 50th writes its pid to the heartbeat file (whole: a
# generation killed while it wrote left it empty, and the test read '' for a pid)
_RUNNER = (
    "import os, sys, time\n"
    "if os.fork():\n    os._exit(0)\n"
    "os.setsid()\n"
    "end, n = time.monotonic() + float(sys.argv[2]), 0\n"
    "while time.monotonic() < end:\n"
    "    if os.fork():\n        os._exit(0)\n"
    "    n += 1\n"
    "    if n % 50 == 0:\n"
    "        partial = f'{sys.argv[1]}.{os.getpid()}'\n"
    "        with open(partial, 'w') as beat:\n            beat.write(str(os.getpid()))\n"
    "        os.replace(partial, sys.argv[1])\n"
)


@plugin.tool("faulty_runner")
def runner(ctx: Context, heartbeat: str, seconds: float = 60) -> str:
    subprocess.run(
        [sys.executable, "-c", _RUNNER, heartbeat, str(seconds)],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # (no pipe: its generations would hold it open)
        stderr=subprocess.DEVNULL,
        timeout=10,
    )
    return "runner started"


_bumps = [0]


@plugin.resource("faulty://counter", mime_type="text/plain")
def counter(ctx: Context) -> str:
    return str(_bumps[0])


@plugin.tool("faulty_bump")
def bump(ctx: Context) -> str:
    _bumps[0] += 1
    ctx.resource_updated("notes://not-ours")  # the kernel drops a change of another's resource
    ctx.resource_updated("faulty://counter")
    return f"bumped to {_bumps[0]}"


_jobs: set[asyncio.Task[None]] = set()


@plugin.tool("faulty_bump_later")
async def bump_later(ctx: Context, seconds: float) -> str:
    """Returns at once; a background job bumps the counter ``seconds`` later and says so."""

    async def job() -> None:
        await asyncio.sleep(seconds)
        _bumps[0] += 1
        ctx.resource_updated("notes://not-ours")  # dropped after the call as during it
        ctx.resource_updated("faulty://counter")

    task = asyncio.get_running_loop().create_task(job())
    _jobs.add(task)
    task.add_done_callback(_jobs.discard)
    return f"bumping in {seconds} s"


@plugin.tool("faulty_log_levels")
def log_levels(ctx: Context) -> str:
    for level in ("debug", "info", "warning", "error"):
        ctx.log(level, f"a {level} message", "faulty")
    return "logged"
