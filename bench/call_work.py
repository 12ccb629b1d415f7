"""The Python work of one governed `tools/call`, counted instead of timed.

CPU figures swing by several points from run to run on a shared 2-core VM; the
work a call makes the interpreter do does not. This starts `mcp0 serve`'s HTTP
server in this process (on uvloop, embedded defaults, the bundled `notes` plugin
and `bench/plugins/echo`, one agent, the per-agent rate limit off as in
governed_calls.py), sends `--calls` governed `tools/call` over HTTP from a client
in its own process, one at a time on one keep-alive connection, and counts per
call, in the server and in the plugin workers:

- Python function calls (cProfile: every entry or resumption of a Python
  function, coroutine or generator) and calls of C functions (builtins and
  methods of built-in types);
- allocations: calls of CPython's malloc, calloc and realloc (object and mem
  domains; the raw domain apart), counted by bench/alloc_count.c, which this
  builds with the C compiler into .bench/ (without one, allocations are left out).

The server runs background tasks on timers (plugin and policy refresh, orphan
sweep, idle-connection reaper): an idle window as long as the calls' is counted
too and taken off. One call at a time means one audit batch (and commit) per
call, the costliest case; the paced load of governed_calls.py gathers a few calls
per batch. Counts are per call; the top functions by calls per call are listed.
Writes .bench/call_work.json, and the server's profile of the calls to
.bench/call_work.prof (for `python -m pstats`: who calls what).

    .venv/bin/python bench/call_work.py [--calls 1000] [--tool echo|notes_add] [--top 30]
        [--policy FILE.cedar]   (a policy file put beside the default one, e.g. one that
                                 reads context.labels, so that detectors run on every call)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import http.client
import json
import os
import pstats
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
OUT_DIR = BENCH.parent / ".bench"
ECHO_PLUGIN = BENCH / "plugins" / "echo"
PROTOCOL_VERSION = "2025-11-25"
TOOLS: dict[str, dict[str, Any]] = {
    "notes_add": {"text": "benchmark note", "tags": ["bench"]},
    "echo": {"text": "benchmark note"},
}
WAIT_S = 30.0

# The plugin workers run this instead of `python -m mcp_zero.sandbox.worker`: the same
# worker, counting between two SIGUSR1 (it writes worker-PID.started, then worker-PID.json,
# in its HOME: the plugin's data dir, the one place a confined worker may write).
WORKER_SHIM = """\
import cProfile, json, os, signal, sys
counter_dir = sys.argv[2]
args = sys.argv[sys.argv.index("mcp_zero.sandbox.worker") + 1:]
sys.path.insert(0, counter_dir)
try:
    import alloc_count
    alloc_count.install()
except ImportError:
    alloc_count = None
prefix = f"{os.environ['HOME']}/worker-{os.getpid()}"
window = {}

def allocations():
    return list(alloc_count.allocations()) if alloc_count else None

def toggle(signum, frame):
    if not window:
        window["allocations"] = allocations()
        if signum == signal.SIGUSR2:
            window["profile"] = cProfile.Profile()
            window["profile"].enable()
        open(prefix + ".started", "w").close()
        return
    profile = window.pop("profile", None)
    if profile is not None:
        profile.disable()
        profile.dump_stats(prefix + ".prof")
    after = allocations()
    before = window.pop("allocations")
    delta = [a - b for a, b in zip(after, before)] if after else None
    with open(prefix + ".tmp", "w") as f:
        json.dump({"entry": args[1] if len(args) > 1 else "", "allocations": delta}, f)
    os.replace(prefix + ".tmp", prefix + ".json")

signal.signal(signal.SIGUSR1, toggle)
signal.signal(signal.SIGUSR2, toggle)
from mcp_zero.sandbox.worker import main
sys.exit(main(args))
"""


def build_counter(out: Path) -> Path | None:
    """Compile bench/alloc_count.c into ``out`` (once); the directory to import it from."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    target = out / f"alloc_count{suffix}"
    source = BENCH / "alloc_count.c"
    if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
        return out
    include = sysconfig.get_paths()["include"]
    cc = os.environ.get("CC", "cc")
    cmd = [cc, "-O2", "-shared", "-fPIC", f"-I{include}", str(source), "-o", str(target)]
    try:
        subprocess.run(cmd, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"allocations not counted: cannot build alloc_count ({exc})", file=sys.stderr)
        return None
    return out


# --- the client, in its own process --------------------------------------------------------


def client(url: str, token: str, tool: str, calls: int, warmup: int) -> None:
    """initialize, warm up, then on each "go" line of stdin `calls` tools/call; "done" after."""
    host, _, port = url.removeprefix("http://").partition("/")[0].partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=WAIT_S)
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
    }

    def post(message: dict[str, Any]) -> dict[str, Any] | None:
        conn.request("POST", "/mcp", json.dumps(message).encode(), headers)
        response = conn.getresponse()
        body = response.read()
        if response.status == 202:
            return None
        if response.status != 200:
            sys.exit(f"client: HTTP {response.status}: {body[:300]!r}")
        session = response.getheader("mcp-session-id")
        if session:
            headers["Mcp-Session-Id"] = session
        reply: dict[str, Any] = json.loads(body)
        if "error" in reply or reply["result"].get("isError"):
            sys.exit(f"client: {message['method']} failed: {reply}")
        return reply

    init = post(
        {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "mcp0-call-work", "version": "1"},
            },
        }
    )
    assert init is not None
    headers["MCP-Protocol-Version"] = init["result"]["protocolVersion"]
    post({"jsonrpc": "2.0", "method": "notifications/initialized"})
    params = {"name": tool, "arguments": TOOLS[tool]}
    request_id = 1
    for _ in range(warmup):
        post({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params})
        request_id += 1
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        # The server drops a connection idle for 5 s (the idle windows are as long as the
        # calls'): a new one for each run, opened by the first request.
        conn.close()
        for _ in range(calls):
            post({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params})
            request_id += 1
        print("done", flush=True)
    conn.close()


# --- counting in the server and its workers ------------------------------------------------


@dataclass
class Window:
    """What one counted stretch of time did, in the server and in the workers."""

    seconds: float = 0.0
    calls: dict[tuple[str, int, str], int] = field(default_factory=dict)  # function: ncalls
    stats: pstats.Stats | None = None  # the server's profile, when the window had one
    allocations: list[int] | None = None  # raw, mem, object
    worker_calls: dict[tuple[str, int, str], int] = field(default_factory=dict)
    worker_allocations: list[int] | None = None


def profile_calls(stats: pstats.Stats) -> dict[tuple[str, int, str], int]:
    return {func: entry[1] for func, entry in stats.stats.items()}  # type: ignore[attr-defined]


def worker_pids(shim: Path) -> list[int]:
    """This process's children that run the counting worker shim."""
    me = str(os.getpid())
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if stat.rpartition(")")[2].split()[1] == me and str(shim).encode() in cmdline:
            pids.append(int(entry))
    return pids


def worker_file(pid: int, suffix: str) -> Path:
    """The file ``suffix`` the counting shim of worker ``pid`` writes in its HOME."""
    with open(f"/proc/{pid}/environ", "rb") as environ:
        home = dict(e.partition(b"=")[::2] for e in environ.read().split(b"\0"))[b"HOME"]
    return Path(os.fsdecode(home)) / f"worker-{pid}{suffix}"


async def wait_for(path: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            sys.exit(f"no {path} after {WAIT_S:.0f}s: did the worker die?")
        await asyncio.sleep(0.01)


class Counting:
    """Counts one window in this process and in the workers: allocations, and with
    ``profiled`` the calls (cProfile), which allocate themselves (a frame object per
    Python call profiled): a window counts one or the other, never both."""

    def __init__(self, shim: Path, counter: Any, *, profiled: bool) -> None:
        self.shim = shim
        self.counter = counter
        self.profiled = profiled
        self.pids: list[int] = []
        self.profile: cProfile.Profile | None = None

    async def __aenter__(self) -> Window:
        self.pids = worker_pids(self.shim)
        for pid in self.pids:
            for suffix in (".started", ".json", ".prof"):
                worker_file(pid, suffix).unlink(missing_ok=True)
        for pid in self.pids:
            os.kill(pid, signal.SIGUSR2 if self.profiled else signal.SIGUSR1)
        for pid in self.pids:
            await wait_for(worker_file(pid, ".started"))
        self.window = Window()
        self.before = list(self.counter.allocations()) if self.counter else None
        self.started = time.monotonic()
        if self.profiled:
            self.profile = cProfile.Profile()
            self.profile.enable()
        return self.window

    async def __aexit__(self, *exc: object) -> None:
        if self.profile is not None:
            self.profile.disable()
        window = self.window
        window.seconds = time.monotonic() - self.started
        if self.counter and self.before is not None:
            after = self.counter.allocations()
            window.allocations = [a - b for a, b in zip(after, self.before, strict=True)]
        if self.profile is not None:
            window.stats = pstats.Stats(self.profile)
            window.calls = profile_calls(window.stats)
            self.profile = None
        for pid in self.pids:
            os.kill(pid, signal.SIGUSR1)
        calls: Counter[tuple[str, int, str]] = Counter()
        allocations: list[int] | None = None
        for pid in self.pids:
            done = worker_file(pid, ".json")
            await wait_for(done)
            if self.profiled:
                calls.update(profile_calls(pstats.Stats(str(worker_file(pid, ".prof")))))
            counted = json.loads(done.read_text())["allocations"]
            if counted is not None:
                so_far = allocations or [0, 0, 0]
                allocations = [a + b for a, b in zip(so_far, counted, strict=True)]
        window.worker_calls = dict(calls)
        window.worker_allocations = allocations


def per_call(busy: dict[Any, int], idle: dict[Any, int], scale: float, n: int) -> dict[Any, float]:
    """Each function's calls per tools/call: the busy window's less the idle window's
    (scaled to the busy window's length)."""
    return {f: (c - idle.get(f, 0) * scale) / n for f, c in busy.items()}


def is_python(func: tuple[str, int, str]) -> bool:
    return func[0] != "~"


def name(func: tuple[str, int, str]) -> str:
    filename, line, function = func
    if filename == "~":
        return function
    for root in (str(BENCH.parent / "src") + "/", sysconfig.get_paths()["stdlib"] + "/"):
        filename = filename.removeprefix(root)
    return f"{filename}:{line}({function})"


def summary(
    busy: dict[Any, int], idle: dict[Any, int], scale: float, n: int, top: int
) -> dict[str, Any]:
    """Python and C function calls per tools/call, and the functions called most."""
    calls = per_call(busy, idle, scale, n)
    ranked = sorted(calls.items(), key=lambda kv: -kv[1])[:top]
    return {
        "python_calls": round(sum(v for f, v in calls.items() if is_python(f)), 1),
        "c_calls": round(sum(v for f, v in calls.items() if not is_python(f)), 1),
        "top": [[name(f), round(v, 2)] for f, v in ranked],
    }


def allocations(
    busy: list[int] | None, idle: list[int] | None, scale: float, n: int
) -> dict[str, float]:
    """Allocations per tools/call: object and mem domains together, and raw apart."""
    if busy is None or idle is None:
        return {}
    raw, mem, obj = ((b - i * scale) / n for b, i in zip(busy, idle, strict=True))
    return {"allocations": round(mem + obj, 1), "raw_allocations": round(raw, 1)}


async def serve_and_count(data_dir: Path, token: str, args: argparse.Namespace) -> dict[str, Any]:
    import mcp_zero.kernel.plugins as plugins_module
    from mcp_zero.config import Settings
    from mcp_zero.rpc.http import HttpApp
    from mcp_zero.rpc.wire import HttpServer
    from mcp_zero.runtime import Runtime
    from mcp_zero.sandbox.process import ProcessRuntime

    work = Path(tempfile.mkdtemp(prefix="counts-", dir=data_dir.parent))
    counter_dir = build_counter(OUT_DIR)
    counter = None
    if counter_dir is not None:
        sys.path.insert(0, str(counter_dir))
        import alloc_count

        alloc_count.install()
        counter = alloc_count
    shim = work / "worker_shim.py"
    shim.write_text(WORKER_SHIM)
    python = work / "python"
    python.write_text(
        f'#!/bin/sh\nexec {sys.executable} -P -s {shim} {work} {counter_dir or work} "$@"\n'
    )
    python.chmod(0o755)

    def counting_runtime(*a: Any, **kw: Any) -> ProcessRuntime:
        return ProcessRuntime(*a, python=str(python), **kw)

    plugins_module.ProcessRuntime = counting_runtime  # type: ignore[misc,assignment]

    settings = Settings(data_dir=data_dir, port=0, rate_limit=0.0)
    runtime = Runtime(settings)
    app = HttpApp(runtime)
    server = HttpServer(app, "127.0.0.1", 0, max_body_bytes=settings.max_body_bytes)
    await app.startup()
    await server.start()
    url = f"http://127.0.0.1:{server.port}/mcp"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--client",
        url,
        token,
        args.tool,
        str(args.calls),
        str(args.warmup),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        if (await proc.stdout.readline()).strip() != b"ready":
            sys.exit("the client did not get ready")
        windows: dict[bool, tuple[Window, Window]] = {}
        for profiled in (False, True):
            counting = Counting(shim, counter, profiled=profiled)
            async with counting as busy:
                proc.stdin.write(b"go\n")
                if (await proc.stdout.readline()).strip() != b"done":
                    sys.exit("the client failed")
            async with counting as idle:
                await asyncio.sleep(busy.seconds)
            windows[profiled] = (busy, idle)
        proc.stdin.write(b"quit\n")
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        server.stop()
        await server.wait_stopped(grace=1.0)
        await app.shutdown()
    n = args.calls
    (a_busy, a_idle), (c_busy, c_idle) = windows[False], windows[True]
    if c_busy.stats is not None:  # for pstats: callers and callees of the counts above
        c_busy.stats.dump_stats(OUT_DIR / "call_work.prof")
    a_scale, c_scale = a_busy.seconds / a_idle.seconds, c_busy.seconds / c_idle.seconds

    def side(worker: bool) -> dict[str, Any]:
        if worker:
            calls = summary(c_busy.worker_calls, c_idle.worker_calls, c_scale, n, args.top)
            allocs = allocations(a_busy.worker_allocations, a_idle.worker_allocations, a_scale, n)
        else:
            calls = summary(c_busy.calls, c_idle.calls, c_scale, n, args.top)
            allocs = allocations(a_busy.allocations, a_idle.allocations, a_scale, n)
        return {**calls, **allocs}

    return {
        "calls": n,
        "seconds": round(a_busy.seconds, 2),
        "server": side(worker=False),
        "workers": side(worker=True),
    }


def prepare(data_dir: Path, tool: str, policy: Path | None = None) -> str:
    """Lay out the data dir (examples, echo installed, ``policy`` beside the default one),
    create agent `bench`; its token."""
    from mcp_zero.config import Settings
    from mcp_zero.runtime import Runtime

    runtime = Runtime(Settings(data_dir=data_dir, port=0))
    try:
        asyncio.run(runtime.finish_first_start())
        plugins = ["notes"]
        if tool == "echo":
            runtime.install_plugin(ECHO_PLUGIN)
            plugins.append("echo")
        spawned = asyncio.run(runtime.agents.spawn("bench", plugins, via="cli"))
        if policy is not None:
            (runtime.settings.policy_dir / policy.name).write_text(policy.read_text())
    finally:
        runtime.close()
    return spawned.token


def report(result: dict[str, Any]) -> None:
    print(f"{result['calls']} governed tools/call ({result['tool']}) in {result['seconds']} s")
    print(f"{'per call':<28}{'server':>12}{'workers':>12}")
    for key, label in (
        ("python_calls", "Python function calls"),
        ("c_calls", "C function calls"),
        ("allocations", "allocations"),
        ("raw_allocations", "raw allocations"),
    ):
        row = [result[side].get(key) for side in ("server", "workers")]
        shown = [f"{v:>12,.1f}" if v is not None else f"{'-':>12}" for v in row]
        print(f"{label:<28}{''.join(shown)}")
    for side in ("server", "workers"):
        print(f"\ntop {side} functions, calls per call:")
        for function, calls in result[side]["top"]:
            print(f"{calls:>8.2f}  {function}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--tool", choices=sorted(TOOLS), default="echo")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--policy", type=Path, help="a .cedar file to add to the policy set")
    parser.add_argument("--client", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        url, token, tool, calls, warmup = args.client
        client(url, token, tool, int(calls), int(warmup))
        return
    import uvloop

    OUT_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mcp0-call-work-") as tmp:
        data_dir = Path(tmp) / "mcp0-data"
        token = prepare(data_dir, args.tool, args.policy)
        result = {"tool": args.tool, **uvloop.run(serve_and_count(data_dir, token, args))}
    (OUT_DIR / "call_work.json").write_text(json.dumps(result, indent=1))
    report(result)


if __name__ == "__main__":
    main()
