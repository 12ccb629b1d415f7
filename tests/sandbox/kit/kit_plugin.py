"""A plugin that misbehaves on request, for the process runtime's tests."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import os
import socket
import time
from typing import Any

from mcp_zero.plugin import (
    ClientRequestError,
    Context,
    NotFoundError,
    Plugin,
    ToolError,
    ToolResult,
    image,
    text,
)

plugin = Plugin("kit")


@plugin.tool("echo")
def echo(ctx: Context, text: str = "hi") -> str:
    return text


@plugin.tool("aecho")
async def aecho(ctx: Context, text: str = "hi") -> dict[str, Any]:
    return {"text": text, "agent": ctx.agent}


@plugin.tool("slow_sync")
def slow_sync(ctx: Context, seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


@plugin.tool("slow_async")
async def slow_async(ctx: Context, seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "slept"


@plugin.tool("hang_sync")
def hang_sync(ctx: Context) -> str:
    time.sleep(3600)  # ignores cancellation: only SIGKILL stops it
    return "never"


@plugin.tool("stubborn")
def stubborn(ctx: Context) -> str:
    """Says it started (progress 1), then ignores cancellation until a file ``gate``
    appears in its data dir."""
    ctx.progress(1)
    while not (ctx.data_dir / "gate").exists():
        time.sleep(0.01)
    return "let through"


@plugin.tool("ask_stubbornly")
async def ask_stubbornly(ctx: Context) -> str:
    """Asks the client for its roots; cancelled meanwhile, runs on until a file ``gate``
    appears in its data dir."""
    try:
        return str(await ctx.request("roots/list", {}))
    except asyncio.CancelledError:
        while not (ctx.data_dir / "gate").exists():
            await asyncio.sleep(0.01)
        raise


@plugin.tool("hang_async")
async def hang_async(ctx: Context) -> str:
    await asyncio.sleep(3600)
    return "never"


@plugin.tool("freeze_loop")
async def freeze_loop(ctx: Context, seconds: float = 0.3) -> str:
    time.sleep(seconds)  # on purpose: frames pile up unread meanwhile
    return "thawed"


@plugin.tool("crash")
def crash(ctx: Context, status: int = 7) -> str:
    os._exit(status)


@plugin.tool("segfault")
def segfault(ctx: Context) -> str:
    ctypes.string_at(0)
    return "unreachable"


@plugin.tool("alloc")
def alloc(ctx: Context, mb: int) -> str:
    block = bytearray(mb * 1024 * 1024)
    return f"allocated {len(block)}"


@plugin.tool("huge")
def huge(ctx: Context, mb: int, char: str = "x") -> str:
    return char * (mb << 20)


@plugin.tool("flood")
def flood(ctx: Context, mb: int) -> str:
    out_fd = ctx._channel._out_fd  # type: ignore[attr-defined]  # the worker's protocol pipe
    chunk = b"z" * (64 << 10)
    for _ in range(mb * 16):
        os.write(out_fd, chunk)  # one endless frame, behind the worker's back
    return "flooded"


@plugin.tool("shout")
def shout(ctx: Context, mb: int) -> str:
    chunk = b"y" * (64 << 10)
    for _ in range(mb * 16):
        os.write(2, chunk)  # never a newline
    return "shouted"


@plugin.tool("spew")
def spew(ctx: Context, lines: int) -> str:
    """Writes stderr lines as fast as the pipe takes them."""
    view = memoryview(b"".join(b"spew %d\n" % i for i in range(lines)))
    while view:
        view = view[os.write(2, view) :]
    return "spewed"


@plugin.tool("yes")
def yes(ctx: Context, seconds: float) -> int:
    """Writes "y" lines to stderr as fast as the pipe takes them for ``seconds``: how many
    bytes it could."""
    chunk = b"y\n" * (32 << 10)
    written, until = 0, time.monotonic() + seconds
    while time.monotonic() < until:
        written += os.write(2, chunk)
    return written


@plugin.tool("flood_then_crash")
def flood_then_crash(ctx: Context, kb: int) -> str:
    """Writes ``kb`` KiB of "y" lines to stderr, then three last lines, and exits (7)."""
    chunk = b"y\n" * 512
    for _ in range(kb):
        os.write(2, chunk)
    os.write(2, b"LAST-WORDS-1\nLAST-WORDS-2\nLAST-WORDS-3\n")
    os._exit(7)


@plugin.tool("noisy")
def noisy(ctx: Context) -> str:
    print("noise from print()")
    os.write(1, b"noise written to fd 1\n")
    return "still fine"


@plugin.tool("fail")
def fail(ctx: Context, how: str) -> str:
    if how == "tool":
        raise ToolError("the tool refused")
    raise KeyError("boom")


@plugin.tool("afail")
async def afail(ctx: Context, how: str) -> Any:
    """The async twin of ``fail``, and what an async tool may return that is not text."""
    if how == "tool":
        raise ToolError("the tool refused")
    if how == "object":
        return object()  # not a result a tool may return
    if how == "long":
        return "x" * (1 << 20) + "y"  # just over the size the worker sends without a check
    if how == "number":
        return 7
    if how == "surrogate":
        return "bad \ud800 text"  # not UTF-8: no frame can carry it
    if how == "long_surrogate":
        return "x" * (1 << 20) + "\ud800"
    if how == "unprintable":

        class Unprintable(Exception):
            def __str__(self) -> str:
                raise RuntimeError("no words")

        raise Unprintable()
    raise KeyError("boom")


@plugin.tool("fork_then_exit")
def fork_then_exit(ctx: Context) -> str:
    """Leaves a child holding the worker's pipes (in its process group), then dies."""
    if os.fork() == 0:
        time.sleep(600)
        os._exit(0)
    os._exit(7)


@plugin.tool("blocks")
def blocks(ctx: Context) -> Any:
    return [text("a picture:"), image(b"\x89PNG fake", "image/png"), "and a string"]


@plugin.tool("explicit")
def explicit(ctx: Context) -> ToolResult:
    return ToolResult(content=["partial"], structured={"n": 1}, is_error=True)


@plugin.tool("not_finite")
def not_finite(ctx: Context, how: str) -> Any:
    """Results holding a float that JSON has no number for."""
    if how == "dict":
        return {"count": 2, "mean": float("nan")}
    if how == "structured":
        return ToolResult("see structuredContent", {"bounds": [0.0, float("inf")]})
    if how == "block":
        return text("ranked", annotations={"priority": float("nan")})
    return float("-inf")


@plugin.tool("chatty")
async def chatty(ctx: Context, question: str) -> dict[str, Any]:
    ctx.progress(1, 3, "starting")
    ctx.log("info", {"asked": question}, "kit")
    answer = await ctx.sample(question, max_tokens=10)
    ctx.progress(2, 3)
    choice = await ctx.elicit("pick one", {"type": "object", "properties": {}})
    ctx.progress(3, 3, "done")
    return {"answer": answer, "choice": choice}


@plugin.tool("updates_then_ask")
async def updates_then_ask(ctx: Context, n: int) -> str:
    """Says ``n`` times that kit://hello changed, then asks the client (a point after them)."""
    for _ in range(n):
        ctx.resource_updated("kit://hello")
    await ctx.elicit("seen?", {"type": "object", "properties": {}})
    return "asked"


@plugin.tool("ask_client")
async def ask_client(ctx: Context, method: str) -> str:
    try:
        return str(await ctx.request(method, {}))
    except ClientRequestError as exc:
        return f"refused: {exc}"


@plugin.tool("forged_notes")
async def forged_notes(ctx: Context) -> str:
    """Progress and log frames the plugin API would refuse, written to the pipe as is."""
    notify = ctx._channel.notify  # type: ignore[attr-defined]  # past the API, on purpose
    call = ctx._call_id  # type: ignore[attr-defined]
    for forged in (
        {"progress": "abc"},
        {"progress": True},
        {"progress": None},
        {"progress": 1, "total": {"x": 1}},
        {"progress": 1, "message": 42},
    ):
        notify({"op": "progress", "call": call, **forged})
    for level, logger in (("bogus", None), (7, None), ("info", 7)):
        notify({"op": "log", "call": call, "level": level, "data": "x", "logger": logger})
    ctx.progress(1, 2, "real")
    ctx.log("info", "real")
    return "forged"


@plugin.tool("progress_steps")
async def progress_steps(ctx: Context, steps: list[float]) -> str:
    """Each of ``steps`` sent as the call's progress, in order."""
    for step in steps:
        ctx.progress(step, 10)
    return "stepped"


@plugin.tool("loud")
async def loud(ctx: Context, kind: str, mb: int) -> str:
    """One notification or client request (``kind``) carrying ``mb`` MiB of text."""
    big = "m" * (mb << 20)
    try:
        if kind == "log":
            ctx.log("info", big)
        elif kind == "progress":
            ctx.progress(1, 2, big)
        elif kind == "resource_updated":
            ctx.resource_updated("kit://hello?" + big)
        else:
            await ctx.elicit(big, {"type": "object", "properties": {}})
    except (ValueError, ClientRequestError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "sent"


@plugin.tool("crowded_log")
def crowded_log(ctx: Context, free_mb: int, chars: int) -> str:
    """Fill the worker's address space but ``free_mb`` MiB, then log ``chars`` emoji: how
    the log ended."""
    hog = []
    try:
        while True:
            hog.append(bytearray(1 << 20))
    except MemoryError:
        del hog[-free_mb:]
    try:
        ctx.log("info", "\U0001f600" * chars)
    except (ValueError, MemoryError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        hog.clear()
    return "logged"


@plugin.tool("forged_loud_log")
def forged_loud_log(ctx: Context, mb: int) -> str:
    """A log frame of ``mb`` MiB written to the pipe as is, past the worker's limit."""
    frame = {"op": "log", "call": ctx._call_id, "level": "info", "data": "f" * (mb << 20)}  # type: ignore[attr-defined]
    ctx._channel._write(json.dumps(frame).encode() + b"\n")  # type: ignore[attr-defined]
    return "forged"


@plugin.tool("chatty_sync")
def chatty_sync(ctx: Context, question: str) -> dict[str, Any]:
    ctx.progress(1, 2)
    ctx.log("warning", "from a thread")
    answer = ctx.sample_sync(question)
    ctx.progress(2, 2)
    return {"answer": answer}


@plugin.tool("whoami")
def whoami(ctx: Context) -> dict[str, Any]:
    return {
        "agent": ctx.agent,
        "data_dir": str(ctx.data_dir),
        "cwd": os.getcwd(),
        "env": sorted(os.environ),
        "pid": os.getpid(),
        "pgid": os.getpgid(0),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "groups": os.getgroups(),
        "capabilities": {  # (hex masks, as /proc shows them)
            line.split(":")[0]: line.split()[1]
            for line in open("/proc/self/status").read().splitlines()
            if line.startswith("Cap")
        },
    }


@plugin.tool("connect")
def connect(ctx: Context, port: int) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return "connected"
    except OSError as exc:
        raise ToolError(f"no network: {exc}") from None


@plugin.tool("reach")
def reach(
    ctx: Context,
    read: list[str] | None = None,
    write: list[str] | None = None,
    signal: list[int] | None = None,
    modules: list[str] | None = None,
    unix: list[str] | None = None,
    keyring: bool = False,
    io_uring: bool = False,
    chmod: list[str] | None = None,
    stat: list[str] | None = None,
) -> dict[str, str]:
    """What this worker can do: "ok" or the error, per path read or written, per pid sent
    signal 0, per module imported, per Unix socket connected to, and the kernel keyring;
    per path whose mode it sets to 0o666 and per path it stats: "ok" or the errno's name."""
    outcome: dict[str, str] = {}

    def attempt(key: str, action: Any, by_errno: bool = False) -> None:
        try:
            action()
            outcome[key] = "ok"
        except (OSError, ImportError) as exc:
            code = getattr(exc, "errno", None)
            outcome[key] = errno.errorcode[code] if by_errno and code else type(exc).__name__

    def read_one(path: str) -> None:
        with open(path, "rb") as file:
            file.read(1)

    def append(path: str) -> None:
        with open(path, "ab"):
            pass

    for path in read or []:
        attempt(f"read {path}", lambda path=path: read_one(path))
    for path in write or []:
        attempt(f"write {path}", lambda path=path: append(path))
    for pid in signal or []:
        attempt(f"signal {pid}", lambda pid=pid: os.kill(pid, 0))
    for path in chmod or []:
        attempt(f"chmod {path}", lambda path=path: os.chmod(path, 0o666), by_errno=True)
    for path in stat or []:
        attempt(f"stat {path}", lambda path=path: os.stat(path), by_errno=True)
    for module in modules or []:
        attempt(f"import {module}", lambda module=module: __import__(module))

    def connect(path: str) -> None:
        with socket.socket(socket.AF_UNIX) as unix_socket:
            unix_socket.connect(path)

    for path in unix or []:
        attempt(f"unix {path}", lambda path=path: connect(path))

    def keyctl() -> None:  # KEYCTL_GET_KEYRING_ID of the session keyring, via syscall()
        libc = ctypes.CDLL(None, use_errno=True)
        number = {"x86_64": 250, "aarch64": 219}[os.uname().machine]
        if libc.syscall(number, 0, -3, 0) < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    if keyring:
        attempt("keyring", keyctl)

    def setup_ring() -> None:  # io_uring_setup(1, &params): its IORING_OP_SOCKET would do
        libc = ctypes.CDLL(None, use_errno=True)
        params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
        ring = libc.syscall(425, 1, params)
        if ring < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        os.close(ring)

    if io_uring:
        attempt("io_uring", setup_ring)
    return outcome


@plugin.tool("sysv_shm")
def sysv_shm(ctx: Context, key: int, mb: int = 0) -> str:
    """Make (``mb`` > 0) and fill a System V shared memory segment of ``key``, or find one
    (``mb`` 0): "ok", or the errno's name."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
    libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    libc.shmat.restype = ctypes.c_void_p
    libc.shmdt.argtypes = [ctypes.c_void_p]
    segment = libc.shmget(key, mb << 20, 0o1000 | 0o600 if mb else 0)  # IPC_CREAT
    if segment < 0:
        return errno.errorcode[ctypes.get_errno()]
    if mb:  # its pages made real, then let go: not in the address space, still held
        address = libc.shmat(segment, None, 0)
        if address is None or address == ctypes.c_void_p(-1).value:
            return errno.errorcode[ctypes.get_errno()]
        ctypes.memset(address, 0x41, mb << 20)
        libc.shmdt(address)
    return "ok"


@plugin.resource("kit://hello", mime_type="text/plain")
def hello(ctx: Context) -> str:
    return f"hello {ctx.agent}"


@plugin.resource_template("kit://items/{id}")
def item(ctx: Context, id: str) -> dict[str, Any]:
    if id == "missing":
        raise NotFoundError(f"no item {id}")
    return {"text": f"item {id}", "mimeType": "text/plain"}


@plugin.resource_template("kit://unsendable/{how}")
def unsendable(ctx: Context, how: str) -> Any:
    """Results no ReadResourceResult can carry."""
    if how == "surrogate":
        return "bad \ud800 text"
    if how == "object":
        return {"text": "x", "extra": object()}
    if how == "text_int":
        return {"text": 5}
    if how == "huge":
        return "x" * (40 << 20)
    return object()


@plugin.prompt("unsendable")
def unsendable_prompt(ctx: Context) -> str:
    return "bad \ud800 text"


@plugin.prompt("greet")
def greet(ctx: Context, name: str) -> str:
    return f"Say hello to {name}"


@plugin.completion(prompt="greet", argument="name")
def names(ctx: Context, value: str, arguments: dict[str, str]) -> list[str]:
    return [n for n in ("alice", "albert", "bob") if n.startswith(value)]
