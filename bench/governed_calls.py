"""Governed tool calls through mcp0 against the plain official SDK server, in one run.

Both servers get the same load: `tools/call` of one tool (`notes_add`, or `echo`
to measure the governed path rather than the tool's SQLite work) over streamable
HTTP (POST /mcp, JSON-RPC, after one `initialize`), from `wrk` in its own process
so the load generator is not the bottleneck. Measured per server:

1. saturation: N concurrent keep-alive connections for D seconds: calls/s,
   p50/p99 latency, CPU% (server process + its children, from /proc), RSS idle
   and peak under load (server + children, e.g. plugin workers);
2. fixed rate: 1,000 calls/s for D seconds: CPU% of one core and latency.

`--floor` also measures a bare ASGI app (bench/floor_server.py) under the same
load: what the HTTP stack alone costs on this machine.

Prints a table and the governed/plain ratios; writes .bench/governed_calls_<tool>.json.
Not a pass/fail test: figures vary with the machine, compare the ratios.

    .venv/bin/python bench/governed_calls.py [--tool notes_add|echo] [--floor]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV_BIN = Path(sys.executable).parent
PROTOCOL_VERSION = "2025-11-25"
# The arguments of every call, per tool.
TOOLS: dict[str, dict[str, Any]] = {
    "notes_add": {"text": "benchmark note", "tags": ["bench"]},
    "echo": {"text": "benchmark note"},
}
ECHO_PLUGIN = BENCH / "plugins" / "echo"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
START_TIMEOUT_S = 60.0
MIN_DURATION_S = 10.0  # the issue's: each phase runs at least 10 s


# --- the servers -------------------------------------------------------------------------------


@dataclass
class Target:
    """A running server under test, the tool called and the headers its requests carry.

    `mcp` is False for the floor, which speaks no MCP (no session to open).
    """

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    tool: str
    headers: dict[str, str] = field(default_factory=dict)
    mcp: bool = True

    @property
    def arguments(self) -> dict[str, Any]:
        return TOOLS[self.tool]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(ready: Any, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    """Polls `ready()` until true; exits with the server's log if it dies or the time runs out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if ready():
                return
        except (httpx2.TransportError, OSError):
            pass
        time.sleep(0.1)
    sys.exit(f"{what} not ready after {START_TIMEOUT_S:.0f}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def mcp0_cli(*args: str) -> str:
    done = subprocess.run(
        [str(VENV_BIN / "mcp0"), *args], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        sys.exit(f"mcp0 {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done.stdout


def spawn_mcp0(data_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            [
                str(VENV_BIN / "mcp0"),
                "serve",
                "--data-dir",
                str(data_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=data_dir.parent,
            # The per-agent rate limit (200 calls/s by default) would turn most of the
            # load into refusals: the bench measures the governed path, not the limit.
            env={**os.environ, "MCP0_RATE_LIMIT": "0"},
        )
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx2.get(f"{base}/readyz").status_code == 200, proc, "mcp0 serve", log)
    return proc


def start_mcp0(workdir: Path, tool: str) -> Target:
    """mcp0 on embedded defaults with the `notes` plugin and an agent allowed to use it.

    The first start creates the data dir and installs the example plugin; with
    the server stopped, the `echo` bench plugin is installed when `tool` is echo
    and the agent is created; then the server starts again. The plugins' quotas
    stay as shipped.
    """
    data_dir = workdir / "mcp0-data"
    log = workdir / "mcp0.log"
    port = free_port()
    stop(spawn_mcp0(data_dir, port, log))
    plugins = ["--plugin", "notes"]
    if tool == "echo":
        mcp0_cli("plugin", "install", str(ECHO_PLUGIN), "--data-dir", str(data_dir))
        plugins += ["--plugin", "echo"]
    agent = json.loads(
        mcp0_cli("agent", "create", "bench", *plugins, "--data-dir", str(data_dir), "--json")
    )
    proc = spawn_mcp0(data_dir, port, log)
    headers = {"Authorization": f"Bearer {agent['token']}"}
    return Target("mcp0 (governed)", f"http://127.0.0.1:{port}/mcp", proc, tool, headers)


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    def listening() -> bool:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True

    wait_until(listening, proc, what, log)


def start_plain(workdir: Path, tool: str) -> Target:
    """The official SDK's MCPServer serving the same tool (bench/plain_server.py)."""
    log = workdir / "plain.log"
    port = free_port()
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(BENCH / "plain_server.py"),
                "--port",
                str(port),
                "--data-dir",
                str(workdir / "plain-data"),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    wait_listening(port, proc, "plain server", log)
    return Target("plain SDK server", f"http://127.0.0.1:{port}/mcp", proc, tool)


def start_script(workdir: Path, script: str, name: str, tool: str, *args: str) -> Target:
    """One of the bench's own servers, `script --port N [args]` (speaks no MCP: no session)."""
    port = free_port()
    log = workdir / f"{Path(script).stem}-{port}.log"
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            [sys.executable, str(BENCH / script), "--port", str(port), *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    wait_listening(port, proc, name, log)
    return Target(name, f"http://127.0.0.1:{port}/mcp", proc, tool, mcp=False)


def start_floor(workdir: Path, tool: str) -> Target:
    """The bare ASGI app of bench/floor_server.py: a constant answer to every POST."""
    return start_script(workdir, "floor_server.py", "bare ASGI floor", tool)


def start_isolation(workdir: Path, tool: str) -> Target:
    """bench/isolation_floor.py: raw HTTP in front of an echo worker process, no governance."""
    return start_script(workdir, "isolation_floor.py", "HTTP + worker floor", tool)


def start_audited(workdir: Path, tool: str) -> Target:
    """bench/isolation_floor.py --audit: the same, writing each call's record durably first."""
    audit_dir = str(workdir / "floor-audit")
    name = "HTTP + worker + audit floor"
    return start_script(workdir, "isolation_floor.py", name, tool, "--audit", audit_dir)


# --- the protocol, done once per server with a real client -------------------------------------


def rpc_body(request_id: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


def decode(response: httpx2.Response) -> dict[str, Any]:
    """The JSON-RPC message of a JSON or a one-event SSE response."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("data:") and line[5:].strip():
                message: dict[str, Any] = json.loads(line[5:])
                return message
        raise ValueError(f"no data in SSE response: {response.text[:300]!r}")
    message = response.json()
    return message if isinstance(message, dict) else {"batch": message}


def open_session(target: Target) -> None:
    """initialize (+ initialized), keeping Mcp-Session-Id when the server gives one; then
    checks that one tools/call succeeds, so the load below measures calls, not errors."""
    headers = {
        **target.headers,
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
    }
    with httpx2.Client(timeout=30.0, headers=headers) as http:
        init = http.post(
            target.url,
            json=rpc_body(
                0,
                "initialize",
                {
                    "protocolVersion": PROTOCOL_VERSION,
                    "capabilities": {},
                    "clientInfo": {"name": "mcp0-bench", "version": "1"},
                },
            ),
        )
        init.raise_for_status()
        negotiated = decode(init)["result"]["protocolVersion"]
        target.headers["MCP-Protocol-Version"] = negotiated
        session = init.headers.get("mcp-session-id")
        if session:
            target.headers["Mcp-Session-Id"] = session
        http.headers.update(target.headers)
        http.post(target.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        params = {"name": target.tool, "arguments": target.arguments}
        call = http.post(target.url, json=rpc_body(1, "tools/call", params))
        message = decode(call)
        if call.status_code != 200 or "error" in message or message["result"].get("isError"):
            failed = f"{call.status_code} {message}"
            sys.exit(f"{target.name}: tools/call {target.tool} failed: {failed}")
        for request_id in range(2, 200):  # warm-up: caches, plugin workers, JIT-free paths
            http.post(target.url, json=rpc_body(request_id, "tools/call", params))


# --- /proc: CPU and memory of the server and its children --------------------------------------


def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(root: int) -> tuple[float, float]:
    """CPU time so far of (the root process, the whole tree including reaped children)."""
    own = tree = 0
    for pid in process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        tree += ticks
        if pid == root:
            own = ticks
            tree += int(fields[13]) + int(fields[14])  # cutime, cstime of reaped children
    return own / CLK_TCK, tree / CLK_TCK


def pss_bytes(root: int) -> int:
    """The proportional set size of the tree at ``root``: each shared page (libpython,
    libcrypto: mapped by the server and every worker) counted once over its sharers, where
    RSS counts it in each. Also what the kernel's fault-around maps of a native library
    whose file is cached (just installed) counts only once."""
    total = 0
    for pid in process_tree(root):
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
    return total


def rss_bytes(root: int) -> int:
    total = 0
    for pid in process_tree(root):
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
        except OSError:
            continue
    return total


def context_switches(pid: int) -> tuple[int, int]:
    """Voluntary and involuntary context switches so far of process ``pid``'s threads: the
    times it slept (in epoll, say: each is a wake-up later) and was preempted."""
    voluntary = involuntary = 0
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, 0
    for tid in threads:
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                voluntary += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                involuntary += int(line.split()[1])
    return voluntary, involuntary


def machine_busy_seconds() -> float:
    """CPU time all cores spent busy since boot (/proc/stat: everything but idle and iowait)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


@contextmanager
def resource_watch(root: int) -> Iterator[dict[str, float]]:
    """Yields a dict filled on exit with cpu_percent (of one core; server and children),
    server_cpu_percent (the server process alone), machine_cpu_percent (every process,
    of one core: up to 100 x cores), peak_rss_bytes, and the server process's
    server_sleeps and server_preemptions (context switches)."""
    figures: dict[str, float] = {}
    peak = [rss_bytes(root)]
    stopped = threading.Event()

    def sample() -> None:
        while not stopped.wait(0.25):
            peak[0] = max(peak[0], rss_bytes(root))

    sampler = threading.Thread(target=sample, daemon=True)
    switches0 = context_switches(root)
    cpu0, busy0, wall0 = cpu_seconds(root), machine_busy_seconds(), time.monotonic()
    sampler.start()
    try:
        yield figures
    finally:
        stopped.set()
        sampler.join(timeout=5)
        own1, tree1 = cpu_seconds(root)
        busy1 = machine_busy_seconds()
        wall = time.monotonic() - wall0
        figures["cpu_percent"] = 100.0 * (tree1 - cpu0[1]) / wall
        figures["server_cpu_percent"] = 100.0 * (own1 - cpu0[0]) / wall
        figures["machine_cpu_percent"] = 100.0 * (busy1 - busy0) / wall
        figures["peak_rss_bytes"] = float(peak[0])
        switches1 = context_switches(root)
        figures["server_sleeps"] = float(switches1[0] - switches0[0])
        figures["server_preemptions"] = float(switches1[1] - switches0[1])


# --- the load: wrk with a Lua script -----------------------------------------------------------

LUA = r"""
local prefix = [==[{"jsonrpc":"2.0","id":]==]
local suffix = [==[SUFFIX]==]
local rate = RATE  -- calls/s for this thread; 0: as fast as the server answers
counter = 0
bad = 0  -- global: done() reads it per thread with thread:get
local threads = {}

function setup(thread)
    table.insert(threads, thread)
end

function init(args)
    wrk.method = "POST"
HEADERS
end

function request()
    counter = counter + 1
    return wrk.format(nil, nil, nil, prefix .. counter .. suffix)
end

function response(status, headers, body)
    if status ~= 200 or body:find('"isError"%s*:%s*true') or body:find('"error"%s*:') then
        bad = bad + 1
    end
end

DELAY

function done(summary, latency, requests)
    local total_bad = 0
    for _, thread in ipairs(threads) do
        total_bad = total_bad + thread:get("bad")
    end
    local e = summary.errors
    io.write(string.format(
        'MCP0_BENCH {"requests":%d,"duration_us":%d,"bad":%d,"p50_us":%d,"p99_us":%d,' ..
        '"mean_us":%.1f,"max_us":%d,"socket_errors":%d,"non_2xx":%d}\n',
        summary.requests, summary.duration, total_bad, latency:percentile(50),
        latency:percentile(99), latency.mean, latency.max,
        e.connect + e.read + e.write + e.timeout, e.status))
end
"""

# Paces requests to a fixed rate: each request takes the next slot of a schedule
# 1/rate apart and waits for it (LuaJIT's FFI gives a wall clock in ms).
LUA_DELAY = r"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_usec; } mcp0_timeval;
int gettimeofday(mcp0_timeval *tv, void *tz);
]]
local tv = ffi.new("mcp0_timeval")
local next_at = nil

function delay()
    ffi.C.gettimeofday(tv, nil)
    local now = tonumber(tv.tv_sec) * 1000 + tonumber(tv.tv_usec) / 1000
    if next_at == nil or next_at < now - 1000 then
        next_at = now
    end
    local wait = next_at - now
    next_at = next_at + 1000 / rate
    if wait < 1 then
        return 0
    end
    return math.floor(wait)
end
"""


def ensure_wrk() -> str:
    """Path of wrk, installed from Debian's packages when missing (needs root)."""
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk not found: installing Debian's package", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "wrk"],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    found = shutil.which("wrk")
    if not found:
        sys.exit("wrk is still missing after apt-get install wrk")
    return found


def lua_script(target: Target, rate: float) -> str:
    """The wrk script for `target`: headers, the tools/call body, and pacing when rate > 0."""
    call = json.dumps(
        {"method": "tools/call", "params": {"name": target.tool, "arguments": target.arguments}},
        separators=(",", ":"),
    )
    suffix = "," + call[1:]  # the id goes first, then the rest of the object
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        **target.headers,
    }
    header_lines = "\n".join(
        f"    wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()
    )
    return (
        LUA.replace("SUFFIX", suffix)
        .replace("RATE", repr(float(rate)))
        .replace("HEADERS", header_lines)
        .replace("DELAY", LUA_DELAY if rate > 0 else "")
    )


def run_wrk(
    wrk: str, target: Target, workdir: Path, connections: int, duration: float, rate: float = 0
) -> dict[str, Any]:
    """Runs one wrk load against `target` and returns its figures (calls/s, latency in ms)."""
    script = workdir / f"load-{os.getpid()}-{int(rate)}.lua"
    script.write_text(lua_script(target, rate))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [
            wrk,
            "-t1",
            f"-c{connections}",
            f"-d{duration:.0f}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            target.url,
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("MCP0_BENCH ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    raw = json.loads(lines[-1].removeprefix("MCP0_BENCH "))
    seconds = raw["duration_us"] / 1e6
    wrk_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {
        "requests": raw["requests"],
        "failed": raw["bad"] + raw["socket_errors"],
        "calls_per_s": raw["requests"] / seconds,
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "mean_ms": raw["mean_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "seconds": seconds,
        "load_generator_cpu_percent": 100.0 * wrk_cpu / seconds,
    }


# --- the run -----------------------------------------------------------------------------------


def measure(
    target: Target, wrk: str, workdir: Path, concurrency: int, duration: float, rate: float
) -> dict[str, Any]:
    """Both phases against one running server."""
    if target.mcp:
        open_session(target)
    pid = target.proc.pid
    idle_rss, idle_pss = rss_bytes(pid), pss_bytes(pid)
    with resource_watch(pid) as saturated:
        load = run_wrk(wrk, target, workdir, concurrency, duration)
    with resource_watch(pid) as paced:
        fixed = run_wrk(wrk, target, workdir, min(concurrency, 16), duration, rate)

    def others(watch: dict[str, float], wrk_run: dict[str, Any]) -> float:
        # Everything but the server and wrk (this script's sampler included): another
        # engineer's tests running at the same time show here, and make the run void.
        return (
            watch["machine_cpu_percent"]
            - watch["cpu_percent"]
            - float(wrk_run["load_generator_cpu_percent"])
        )

    return {
        "server": target.name,
        "saturation": {
            **load,
            "concurrency": concurrency,
            "cpu_percent": saturated["cpu_percent"],
            "server_cpu_percent": saturated["server_cpu_percent"],
            # What a call costs when the server never sleeps (hot caches, no wake-ups),
            # comparable to the paced figure per 1,000 calls/s.
            "cpu_percent_per_1k_calls_per_s": saturated["cpu_percent"] * 1000 / load["calls_per_s"],
            "idle_rss_mib": idle_rss / 2**20,
            "idle_pss_mib": idle_pss / 2**20,
            "peak_rss_mib": saturated["peak_rss_bytes"] / 2**20,
            "others_cpu_percent": others(saturated, load),
        },
        "fixed_rate": {
            **fixed,
            "target_calls_per_s": rate,
            "cpu_percent": paced["cpu_percent"],
            "server_cpu_percent": paced["server_cpu_percent"],
            # The plain server may not reach the rate: compare CPU per 1,000 calls/s too.
            "cpu_percent_per_1k_calls_per_s": paced["cpu_percent"] * 1000 / fixed["calls_per_s"],
            "peak_rss_mib": paced["peak_rss_bytes"] / 2**20,
            "others_cpu_percent": others(paced, fixed),
            # Wake-ups cost most at this load (bench/wake_penalty.py): the server's sleeps
            # (each a wake-up) and preemptions per call
            "server_sleeps_per_call": paced["server_sleeps"] / max(fixed["requests"], 1),
            "server_preemptions_per_call": paced["server_preemptions"] / max(fixed["requests"], 1),
        },
    }


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


PER_1K = "cpu_percent_per_1k_calls_per_s"
ROWS = [
    ("calls/s (saturation)", "saturation", "calls_per_s", "{:,.0f}"),
    ("p50 latency ms", "saturation", "p50_ms", "{:.2f}"),
    ("p99 latency ms", "saturation", "p99_ms", "{:.2f}"),
    ("CPU % of one core (saturation)", "saturation", "cpu_percent", "{:.0f}"),
    ("  of which the server process", "saturation", "server_cpu_percent", "{:.0f}"),
    ("CPU % per 1,000 calls/s (saturation)", "saturation", PER_1K, "{:.1f}"),
    ("RSS idle MiB", "saturation", "idle_rss_mib", "{:.1f}"),
    ("  PSS idle MiB (shared pages split)", "saturation", "idle_pss_mib", "{:.1f}"),
    ("RSS peak under load MiB", "saturation", "peak_rss_mib", "{:.1f}"),
    ("failed calls (saturation)", "saturation", "failed", "{:d}"),
    ("wrk's own CPU % (saturation)", "saturation", "load_generator_cpu_percent", "{:.0f}"),
    ("other processes' CPU % (saturation)", "saturation", "others_cpu_percent", "{:.0f}"),
    ("calls/s achieved (paced)", "fixed_rate", "calls_per_s", "{:,.0f}"),
    ("CPU % of one core (paced)", "fixed_rate", "cpu_percent", "{:.1f}"),
    ("  of which the server process", "fixed_rate", "server_cpu_percent", "{:.1f}"),
    ("CPU % per 1,000 calls/s (paced)", "fixed_rate", PER_1K, "{:.1f}"),
    ("  server sleeps per call", "fixed_rate", "server_sleeps_per_call", "{:.2f}"),
    ("  server preemptions per call", "fixed_rate", "server_preemptions_per_call", "{:.2f}"),
    ("p50 latency ms (paced)", "fixed_rate", "p50_ms", "{:.2f}"),
    ("p99 latency ms (paced)", "fixed_rate", "p99_ms", "{:.2f}"),
    ("failed calls (paced)", "fixed_rate", "failed", "{:d}"),
    ("other processes' CPU % (paced)", "fixed_rate", "others_cpu_percent", "{:.0f}"),
]
COLUMNS = {
    "mcp0": "mcp0 (governed)",
    "plain": "plain SDK",
    "floor": "bare ASGI",
    "isolation": "HTTP+worker",
    "audited": "+audit",
}


def report(results: dict[str, Any]) -> dict[str, float | None] | None:
    """Prints the table of the servers measured; returns the ratios governed / plain when
    both were measured (the floors get a column, no ratio)."""
    measured = [key for key in COLUMNS if key in results]
    both = "mcp0" in results and "plain" in results
    ratios: dict[str, float | None] = {}
    head = "".join(f"{COLUMNS[key]:>16}" for key in measured)
    print(f"\n{results['tool']:38}{head}{'governed/plain':>16}" if both else f"\n{'':38}{head}")
    for label, phase, key, fmt in ROWS:
        cells = "".join(f"{fmt.format(results[col][phase][key]):>16}" for col in measured)
        shown = ""
        if both:
            r = ratio(float(results["mcp0"][phase][key]), float(results["plain"][phase][key]))
            ratios[f"{phase}.{key}"] = r
            shown = f"{r:.2f}x" if r is not None else "-"
        print(f"{label:38}{cells}{shown:>16}")
    return ratios if both else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Governed tool calls (mcp0) vs the plain official SDK server, same load."
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help=f"seconds per phase (>= {MIN_DURATION_S:g})"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent connections")
    parser.add_argument("--rate", type=float, default=1000.0, help="calls/s of the paced phase")
    parser.add_argument("--tool", choices=tuple(TOOLS), default="notes_add", help="tool called")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure the floors: a bare ASGI app; raw HTTP + an echo worker process;"
        " and the same writing a durable audit record per call",
    )
    parser.add_argument(
        "--only", choices=tuple(COLUMNS), help="measure one server only (no ratios)"
    )
    parser.add_argument("--output", type=Path, help="default .bench/governed_calls_<tool>.json")
    args = parser.parse_args()
    output: Path = args.output or REPO / ".bench" / f"governed_calls_{args.tool}.json"
    short = args.duration < MIN_DURATION_S
    if short:  # (a quick look: its figures are no measurement of the bars)
        print(f"--duration {args.duration:g} is under {MIN_DURATION_S:g} s: a short run, marked so")

    wrk = ensure_wrk()
    results: dict[str, Any] = {
        "tool": args.tool,
        "arguments": TOOLS[args.tool],
        "duration_s": args.duration,
        "short_run": short,
        "concurrency": args.concurrency,
        "rate": args.rate,
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_before": os.getloadavg(),
        # The only limit lifted; the plugins' quotas are the shipped manifests'.
        "mcp0_overrides": {"MCP0_RATE_LIMIT": "0"},
    }
    starters = {
        "mcp0": start_mcp0,
        "plain": start_plain,
        "floor": start_floor,
        "isolation": start_isolation,
        "audited": start_audited,
    }
    floors = ["floor", "isolation", "audited"] if args.floor else []
    wanted = [args.only] if args.only else ["mcp0", "plain", *floors]
    with tempfile.TemporaryDirectory(prefix="mcp0-bench-") as tmp:
        workdir = Path(tmp)
        for key in wanted:
            target = starters[key](workdir, args.tool)
            try:
                print(f"measuring {target.name} at {target.url} ...", flush=True)
                results[key] = measure(
                    target, wrk, workdir, args.concurrency, args.duration, args.rate
                )
            finally:
                stop(target.proc)
    ratios = report(results)
    if short:
        print(f"(a short run: phases of {args.duration:g} s, under {MIN_DURATION_S:g} s)")
    if ratios is not None:
        results["ratios_governed_over_plain"] = ratios
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {output}")


if __name__ == "__main__":
    main()
