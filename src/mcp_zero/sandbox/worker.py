"""The plugin worker: one sandboxed process serving one plugin's handlers.

Run as ``python -m mcp_zero.sandbox.worker PLUGIN_DIR MODULE:ATTR`` (or with
``MCP0_PLUGIN_DIR`` / ``MCP0_PLUGIN_ENTRY`` in the environment). Other settings
come from the environment: ``MCP0_DATA_DIR`` (the plugin's private directory,
default the cwd), ``MCP0_MEMORY_MB`` (address-space limit, 0 for none),
``MCP0_MAX_THREADS`` (threads for plain handlers), ``MCP0_NETWORK`` (``1`` keeps
the network; otherwise the worker enters an empty network namespace when the
host allows it), ``MCP0_FILESYSTEM`` (``private``: it may write its data dir;
``none``: nowhere), ``MCP0_PROTECT`` (a directory it must not reach: the
server's data dir), ``MCP0_WORKER_UID`` / ``MCP0_WORKER_GID`` (the user a worker
started as root runs as) and ``MCP0_PARENT_PID``; the ``mimeType`` of each resource and
template it reads from the plugin's plugin.json. Where the kernel has Landlock, the
worker confines its own file access before it loads the plugin: it reads the
system's files, its interpreter and import path and the plugin's code, and
writes only its data dir. In its own mount namespace, every filesystem is
read-only but its data dir, and the server's data dir is covered but for the
plugin's own directories (what Landlock does not govern: ``chmod``, ``stat``…).
Stdlib only (orjson/uvloop if present).

Protocol: JSON lines (one object per line) on the worker's stdin and stdout.
The plugin's own ``print()`` and fd-1 writes go to stderr, never into frames.

Kernel → worker::

    {"id": N, "op": "call_tool", "name": str, "arguments": {...}, "agent": str}
    {"id": N, "op": "read_resource", "uri": str, "agent": str}
    {"id": N, "op": "get_prompt", "name": str, "arguments": {...}, "agent": str}
    {"id": N, "op": "complete", "ref": {...}, "argument": {"name", "value"},
     "context": {"arguments": {...}} | null, "agent": str}
    {"op": "cancel", "id": N}                       # abandon call N
    {"op": "reply", "id": R, "result": {...}}       # answer to worker request R
    {"op": "reply", "id": R, "error": {"message": str, "code": int | null}}

Worker → kernel::

    {"op": "confined", "sandbox": {"network_isolated", "files_confined",
     "mounts_confined", "processes_hidden", "syscalls_restricted", "unprivileged": bool}}
                                                    # first, before any plugin code runs
    {"op": "ready", "pid", "tools", "resources", "templates", "prompts"}
                                                    # once, after the plugin loaded
    {"op": "fatal", "message": str}                 # the plugin failed to load; exits 3
    {"id": N, "result": {...}}                      # an MCP result object
    {"id": N, "error": {"kind": "not_found" | "invalid" | "failed" | "cancelled",
                        "message": str}}
    {"op": "progress", "call": N, "progress", "total", "message"}
    {"op": "log", "call": N, "level", "data", "logger"}
    {"op": "close_stream", "call": N}               # let the client reconnect (SEP-1699)
    {"op": "resource_updated", "call": N, "uri": str}  # tell the resource's subscribers
    {"op": "request", "call": N, "id": R, "method": str, "params": {...}, "key"?: str,
     "thread"?: true}                               # true: a plain handler's thread waits
    {"op": "retire", "reason": str}                 # replace me (after a MemoryError)

Every call gets exactly one response frame, also after a cancel (the kernel
uses it to know the handler really stopped). Async handlers run as tasks on
the worker's loop, plain ones in a thread pool, so calls overlap. End of stdin
ends the worker at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import importlib
import itertools
import os
import resource
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from mcp_zero import memory
from mcp_zero.fdio import write_all
from mcp_zero.plugin import (
    ClientRequestError,
    Context,
    Handler,
    NotFoundError,
    Plugin,
    ToolError,
    declared_mime_types,
)
from mcp_zero.sandbox import isolation, ownership, proctree, results
from mcp_zero.sandbox.frames import (
    LARGE_FRAME_CHARS,
    MAX_NOTIFICATION_BYTES,
    FrameTooLarge,
    LineSplitter,
    decode,
    encode,
    encode_frame,
)

JSON = dict[str, Any]
FATAL_EXIT = 3


_THREAD_STACK_BYTES = 1 << 20


class Worker:
    """Serves one loaded :class:`~mcp_zero.plugin.Plugin` over the frame protocol."""

    def __init__(
        self, plugin: Plugin, out_fd: int, data_dir: Path, max_threads: int, memory_mb: int = 0
    ) -> None:
        self.plugin = plugin
        self.data_dir = data_dir
        self.memory_mb = memory_mb  # its address-space limit (0: none)
        self._out_fd = out_fd
        self._write_lock = threading.Lock()
        # Sync calls a pool thread has taken up; _submit's answer for one no thread could
        # be started for takes it out of _active: whichever comes first has it (the lock)
        self._claim_lock = threading.Lock()
        self._claimed: set[int] = set()
        # Handler threads are counted against RLIMIT_AS: the default 8 MiB stack each would
        # let 32 concurrent calls exhaust a 256 MiB plugin ("can't start new thread").
        threading.stack_size(_THREAD_STACK_BYTES)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_threads, thread_name_prefix="plugin"
        )
        self._active: dict[int, Context] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._requests: dict[int, tuple[int, asyncio.Future[JSON]]] = {}
        self._request_ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future[None] | None = None
        self._retired = False

    # -- output ---------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        """Write encoded frames whole; safe from any thread."""
        with self._write_lock:
            write_all(self._out_fd, data)

    def send(self, frame: JSON) -> None:
        """Write one frame; safe from any thread. Raises what :func:`encode_frame` raises."""
        self._write(encode_frame(frame))

    def notify(self, frame: JSON) -> None:
        """:class:`~mcp_zero.plugin.Channel` notifications; unserializable data is stringified.
        Raises ``ValueError`` for one over ``MAX_NOTIFICATION_BYTES`` as JSON."""
        try:
            try:
                data = encode_frame(frame, MAX_NOTIFICATION_BYTES)
            except TypeError:
                frame = {**frame, "data": repr(frame.get("data"))}
                data = encode_frame(frame, MAX_NOTIFICATION_BYTES)
        except FrameTooLarge as exc:  # (the kernel would not relay it to the client)
            raise ValueError(
                f"this {frame['op']} notification {exc}: send large data as the call's "
                "result or as a resource"
            ) from None
        self._write(data)

    def _respond(self, call_id: int, op: str, body: JSON) -> None:
        """Answer call ``call_id`` (an ``op`` frame) with what its handler came to. A result
        that cannot be sent (not JSON, too large) fails the call: a tool's with an error
        result, others' with an error (not a tool's result, which clients refuse: found
        by review)."""
        self._active.pop(call_id, None)
        self._tasks.pop(call_id, None)
        try:
            data = encode_frame({"id": call_id, **body})
        except TypeError as exc:
            data = _unsendable(call_id, op, f"result is not JSON: {exc}")
        except MemoryError:
            self._retire("MemoryError")  # the heap may be fragmented: ask to be replaced
            message = "MemoryError: " + _over_quota("no room to encode the result", self.memory_mb)
            data = _unsendable(call_id, op, message)
        except FrameTooLarge as exc:
            data = _unsendable(call_id, op, f"the result {exc}")
        self._write(data)

    def _refuse(self, call_id: int, kind: str, message: str) -> None:
        """Answer call ``call_id`` with an error of the worker's own."""
        self._active.pop(call_id, None)
        self._tasks.pop(call_id, None)
        self.send({"id": call_id, "error": {"kind": kind, "message": message}})

    # -- requests to the client ----------------------------------------------

    async def request(
        self,
        call_id: int,
        method: str,
        params: JSON,
        key: str | None = None,
        *,
        thread: bool = False,
    ) -> JSON:
        """Relay a request to the MCP client through the kernel and await its answer;
        ``thread``: a plain handler's thread is blocked on it."""
        assert self._loop is not None
        rid = next(self._request_ids)
        fut: asyncio.Future[JSON] = self._loop.create_future()
        self._requests[rid] = (call_id, fut)
        frame: JSON = {"op": "request", "call": call_id, "id": rid, "method": method}
        frame["params"] = params
        if key is not None:
            frame["key"] = key
        if thread:
            frame["thread"] = True
        try:
            try:
                self.send(frame)
            except FrameTooLarge as exc:  # (the kernel would kill a worker sending it)
                raise ValueError(f"this {method} request {exc}") from None
            return await fut
        finally:
            self._requests.pop(rid, None)

    def request_blocking(
        self, call_id: int, method: str, params: JSON, key: str | None = None
    ) -> JSON:
        """:meth:`request` from a handler thread."""
        assert self._loop is not None
        if threading.current_thread() is threading.main_thread():
            raise RuntimeError("in an async handler use 'await ctx.request(...)'")
        return asyncio.run_coroutine_threadsafe(
            self.request(call_id, method, params, key, thread=True), self._loop
        ).result()

    # -- input ----------------------------------------------------------------

    def dispatch(self, line: bytes) -> None:
        """Handle one frame from the kernel."""
        frame = decode(line)
        op = frame.get("op")
        if op == "reply":
            self._on_reply(frame)
        elif op == "cancel":
            self._on_cancel(int(frame["id"]))
        elif op == "call_tool":
            self._call_tool(frame)
        else:
            self._start(frame)

    def _on_reply(self, frame: JSON) -> None:
        entry = self._requests.get(int(frame["id"]))
        if entry is None or entry[1].done():
            return
        fut = entry[1]
        if "error" in frame:
            err = frame["error"] or {}
            fut.set_exception(ClientRequestError(str(err.get("message")), err.get("code")))
        else:
            fut.set_result(frame.get("result") or {})

    def _on_cancel(self, call_id: int) -> None:
        ctx = self._active.get(call_id)
        if ctx is not None:
            ctx.cancelled = True
        task = self._tasks.get(call_id)
        if task is not None:
            task.cancel()
            # A task cancelled before its first step never runs its handler, nor the try
            # that answers for it: then this answers (read with its call_tool, the cancel
            # went unanswered and the worker was killed as "ignoring" it: found by review)
            task.add_done_callback(functools.partial(self._answer_cancelled, call_id))
        for owner, fut in list(self._requests.values()):
            if owner == call_id:
                fut.cancel()

    def _answer_cancelled(self, call_id: int, task: asyncio.Task[None]) -> None:
        if self._tasks.get(call_id) is task:  # its coroutine ended without answering
            self._refuse(call_id, "cancelled", "cancelled")

    def _call_tool(self, frame: JSON) -> None:
        """``_start`` for the most frequent frame, with less on the way."""
        call_id = int(frame["id"])
        name = frame["name"]
        tool = self.plugin.tools.get(name)
        if tool is None:
            message = f"tool {name!r} is not served by this plugin"
            self._refuse(call_id, "not_found", message)
            return
        ctx = self._active[call_id] = Context(
            str(frame.get("agent", "")), self.data_dir, call_id, self
        )
        arguments = frame.get("arguments") or {}
        if tool.is_async:
            assert self._loop is not None
            self._tasks[call_id] = self._loop.create_task(
                self._run_tool(call_id, tool, ctx, arguments)
            )
        else:
            self._submit(call_id, "call_tool", tool, ctx, (), arguments, results.tool_result)

    async def _run_tool(self, call_id: int, tool: Handler, ctx: Context, arguments: JSON) -> None:
        try:
            value = await tool.fn(ctx, **arguments)
        except BaseException as exc:  # the handler's failure is the caller's answer
            self._respond(call_id, "call_tool", self._failure("call_tool", exc))
            return
        if type(value) is str and len(value) <= LARGE_FRAME_CHARS:
            # The most frequent result, small for certain: no walk for large strings.
            self._active.pop(call_id, None)
            self._tasks.pop(call_id, None)
            try:
                data = encode(
                    {"id": call_id, "result": {"content": [{"type": "text", "text": value}]}}
                )
            except TypeError as exc:  # a lone surrogate is no UTF-8 (the task died unanswered
                # and the worker was killed as ignoring its cancel: found by review)
                data = _unsendable(call_id, "call_tool", f"result is not JSON: {exc}")
            self._write(data)
            return
        try:
            body = {"result": results.tool_result(value)}
        except Exception as exc:  # no result can be made of it: the plugin's failure
            body = self._failure("call_tool", exc, returned=True)
        self._respond(call_id, "call_tool", body)

    def _start(self, frame: JSON) -> None:
        call_id = int(frame["id"])
        op = str(frame.get("op"))
        try:
            handler, args, kwargs, finish = self._resolve(op, frame)
        except LookupError as exc:
            self._refuse(call_id, "not_found", str(exc))
            return
        if handler is None:  # nothing registered: an empty answer (completion)
            self._respond(call_id, op, {"result": finish(None)})
            return
        ctx = Context(str(frame.get("agent", "")), self.data_dir, call_id, self)
        self._active[call_id] = ctx
        if handler.is_async:
            assert self._loop is not None
            self._tasks[call_id] = self._loop.create_task(
                self._run_async(call_id, op, handler, ctx, args, kwargs, finish)
            )
        else:
            self._submit(call_id, op, handler, ctx, args, kwargs, finish)

    def _submit(self, call_id: int, op: str, handler: Handler, ctx: Context, *rest: Any) -> None:
        """Run a handler that is no coroutine on a pool thread. A thread that cannot be
        started (its plugin's memory all taken: the stack is address space) fails this call,
        as a MemoryError: it ended the worker, and every call running in it (found by
        review). The pool keeps what it queued before it tried, and a thread of it that
        comes free may take it up at once: the call is answered once, by whichever of the
        two claims it first. (``rest``: the handler's args, kwargs and finish, for
        ``_run_sync``.)"""
        try:
            self._pool.submit(self._run_sync, call_id, op, handler, ctx, *rest)
        except RuntimeError as exc:
            with self._claim_lock:
                if call_id in self._claimed or self._active.get(call_id) is not ctx:
                    return  # a thread took it up after all: it answers
                del self._active[call_id]  # (claimed: _run_sync skips it)
            cause = MemoryError(f"{exc} to run the call") if "thread" in str(exc) else exc
            self._respond(call_id, op, self._failure(op, cause))

    def _resolve(self, op: str, frame: JSON) -> tuple[Handler | None, tuple[Any, ...], JSON, Any]:
        p = self.plugin
        if op == "read_resource":
            uri = frame["uri"]
            match = p.match_resource(uri)
            if match is None:
                raise LookupError(f"no resource {uri!r} in this plugin")
            handler, variables = match
            mime = handler.mime_type
            return handler, (), variables, lambda v: results.resource_result(uri, v, mime)
        if op == "get_prompt":
            name = frame["name"]
            prompt = p.prompts.get(name)
            if prompt is None:
                raise LookupError(f"prompt {name!r} is not served by this plugin")
            return prompt, (), frame.get("arguments") or {}, results.prompt_result
        if op == "complete":
            ref = frame.get("ref") or {}
            arg = frame.get("argument") or {}
            target = ref.get("name") if ref.get("type") == "ref/prompt" else ref.get("uri")
            key = (str(ref.get("type")), str(target), str(arg.get("name")))
            chosen = (frame.get("context") or {}).get("arguments") or {}
            return (
                p.completions.get(key),
                (str(arg.get("value", "")), chosen),
                {},
                results.completion_result,
            )
        raise LookupError(f"unknown op {op!r}")

    # -- running handlers -----------------------------------------------------

    async def _run_async(
        self,
        call_id: int,
        op: str,
        handler: Handler,
        ctx: Context,
        args: tuple[Any, ...],
        kwargs: JSON,
        finish: Any,
    ) -> None:
        try:
            value = await handler.fn(ctx, *args, **kwargs)
        except BaseException as exc:  # the handler's failure is the caller's answer
            self._respond(call_id, op, self._failure(op, exc))
            return
        self._finish(call_id, op, finish, value)

    def _run_sync(
        self,
        call_id: int,
        op: str,
        handler: Handler,
        ctx: Context,
        args: tuple[Any, ...],
        kwargs: JSON,
        finish: Any,
    ) -> None:
        with self._claim_lock:
            if call_id in self._claimed or self._active.get(call_id) is not ctx:
                return  # answered already: no thread could be started for it (_submit)
            self._claimed.add(call_id)
        try:
            try:
                value = handler.fn(ctx, *args, **kwargs)
            except BaseException as exc:  # the handler's failure is the caller's answer
                self._respond(call_id, op, self._failure(op, exc))
                return
            self._finish(call_id, op, finish, value)
        finally:
            with self._claim_lock:
                self._claimed.discard(call_id)

    def _finish(self, call_id: int, op: str, finish: Any, value: Any) -> None:
        """Answer with the result ``finish`` makes of what a handler returned."""
        try:
            body = {"result": finish(value)}
        except Exception as exc:  # no result can be made of it: the plugin's failure
            body = self._failure(op, exc, returned=True)
        self._respond(call_id, op, body)

    def _failure(self, op: str, exc: BaseException, *, returned: bool = False) -> JSON:
        """The answer to an ``op`` call whose handler raised ``exc``, or whose return value
        no result could be made of (``returned``: never the caller's InvalidParams, which
        a resource handler returning an ``object()`` was)."""
        if isinstance(exc, asyncio.CancelledError | concurrent.futures.CancelledError):
            return {"error": {"kind": "cancelled", "message": "cancelled"}}
        if isinstance(exc, MemoryError):
            # The heap may be fragmented or a library half-updated: ask to be replaced.
            self._retire("MemoryError")
        if not isinstance(exc, ToolError | NotFoundError):
            traceback.print_exception(exc, file=sys.stderr)
        try:
            text = str(exc)
        except Exception as broken:  # the exception's own __str__ failed: the call still ends
            text = f"(its message could not be made: {type(broken).__name__})"
        if isinstance(exc, MemoryError):  # (its message is empty, or says nothing of why)
            text = _over_quota(text, self.memory_mb)
        described = text if isinstance(exc, ToolError) else f"{type(exc).__name__}: {text}"
        if op == "call_tool":
            return {"result": results.error_result(described)}
        if isinstance(exc, NotFoundError):
            return {"error": {"kind": "not_found", "message": text}}
        invalid = not returned and isinstance(exc, ToolError | TypeError)
        kind = "invalid" if invalid else "failed"
        return {"error": {"kind": kind, "message": described}}

    def _retire(self, reason: str) -> None:
        if not self._retired:
            self._retired = True
            self.send({"op": "retire", "reason": reason})

    # -- lifecycle ------------------------------------------------------------

    def stop(self) -> None:
        """End of input: the kernel is gone or wants this worker gone."""
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def serve(self, in_fd: int, ready: JSON) -> None:
        """Announce ``ready`` and serve frames from ``in_fd`` until it closes."""
        self._loop = asyncio.get_running_loop()
        self._done = self._loop.create_future()
        memory.trim()  # what loading the plugin left in the heap: ~1 MiB of each worker
        self.send(ready)
        reader = open(in_fd, "rb", buffering=0)  # noqa: SIM115, ASYNC230 - a pipe, owned by the transport
        await self._loop.connect_read_pipe(lambda: _FrameReader(self), reader)
        self._loop.call_later(memory.TRIM_EVERY_S, self._trim)
        await self._done

    def _trim(self) -> None:
        """What a burst of large results left in the heap goes back to the system."""
        memory.trim()
        if self._loop is not None and self._done is not None and not self._done.done():
            self._loop.call_later(memory.TRIM_EVERY_S, self._trim)


def _unsendable(call_id: int, op: str, message: str) -> bytes:
    """The answer to call ``call_id`` (an ``op`` frame) whose result cannot be sent."""
    if op == "call_tool":
        return encode_frame({"id": call_id, "result": results.error_result(message)})
    return encode_frame({"id": call_id, "error": {"kind": "failed", "message": message}})


class _FrameReader(asyncio.Protocol):
    """Splits the kernel's byte stream into frames."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._lines = LineSplitter()

    def data_received(self, data: bytes) -> None:
        for line in self._lines.feed(data):
            self._worker.dispatch(line)

    def connection_lost(self, exc: Exception | None) -> None:
        self._worker.stop()


def load_plugin(plugin_dir: str, entry: str) -> Plugin:
    """Import ``module:attribute`` from ``plugin_dir``; raises ``ImportError`` / ``TypeError``."""
    module_name, _, attr = entry.partition(":")
    top = module_name.partition(".")[0]
    if top in sys.modules:  # its import would give that module (found by review)
        raise ImportError(
            f"module {top!r}, which the manifest's entry {entry!r} names, is one the worker "
            "has imported already (its Python's, not the plugin's): rename the plugin's "
            "module and its entry"
        )
    sys.path.insert(0, plugin_dir)
    module = importlib.import_module(module_name)
    name = attr or "plugin"
    if not hasattr(module, name):  # (it said "'m:x' is NoneType": found by review)
        raise ImportError(
            f"module {module_name!r} has no attribute {name!r}, which the manifest's entry "
            f"{entry!r} names (module:attribute of the Plugin)"
        )
    obj = getattr(module, name)
    if not isinstance(obj, Plugin):
        raise TypeError(f"{entry!r} is {type(obj).__name__}, not a mcp_zero.plugin.Plugin")
    return obj


def _close_inherited(keep: int = 2) -> None:
    """Close every descriptor above ``keep`` (stderr): uvloop's ``subprocess_exec`` does
    not close the server's inheritable ones, and a file the server was started with (a
    shell's ``exec 77<>secret``) would reach plugin code past Landlock and the mount view,
    which govern opening, not what is already open."""
    os.closerange(keep + 1, max(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 1024))


def _isolate_stdio() -> tuple[int, int]:
    """Keep private copies of the protocol fds; point fds 0/1 at /dev/null and stderr."""
    _close_inherited()
    in_fd, out_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return in_fd, out_fd


def editable_paths() -> list[str]:
    """Where packages installed in editable mode import from, when not through ``sys.path``:
    setuptools' finders (PEP 660, ``__editable___<name>_finder`` modules that site's
    ``.pth`` files import at start) map package names to directories of a checkout."""
    paths: list[str] = []
    for name, module in list(sys.modules.items()):
        mapping = getattr(module, "MAPPING", None) if name.startswith("__editable__") else None
        if isinstance(mapping, dict):
            paths.extend(str(p) for p in mapping.values())
    return paths


def _file_access(plugin_dir: str, env: os._Environ[str]) -> tuple[list[str], list[str]]:
    """What the worker may read and execute, and what it may write (the module docstring)."""
    read = [
        *isolation.SYSTEM_READ,
        *{sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix},
        *(p for p in sys.path if p and os.path.isdir(p)),
        *editable_paths(),
        plugin_dir,
    ]
    write = list(isolation.SYSTEM_WRITE)
    if env.get("MCP0_FILESYSTEM", "private") == "private":
        write += [env.get("MCP0_DATA_DIR") or os.getcwd(), isolation.SHARED_MEMORY]
    return read, write


def _fatal(out_fd: int, message: str) -> int:
    """Tell the kernel why this worker cannot serve (its load error), and end."""
    write_all(out_fd, encode_frame({"op": "fatal", "message": message}))
    return FATAL_EXIT


def _identity(env: os._Environ[str]) -> tuple[int, int] | None:
    """The user and group a root worker switches to (``MCP0_WORKER_UID`` / ``_GID``)."""
    uid, gid = env.get("MCP0_WORKER_UID"), env.get("MCP0_WORKER_GID")
    if os.geteuid() != 0 or not uid or not gid:
        return None
    return int(uid), int(gid)


def _server(env: os._Environ[str]) -> list[int]:
    """The server's pid, process group and threads, which the worker may not signal: a
    signal to any of its threads' ids is the process's (found by a bug hunt). A thread the
    server starts later is not among them; Landlock's signal scope (ABI 6, Linux 6.12)
    covers those."""
    pid = int(env.get("MCP0_PARENT_PID", "0"))
    if pid <= 0:
        return []
    try:
        found = [pid, os.getpgid(pid)]
    except OSError:  # (gone: the worker's parent-death signal ends it)
        return [pid]
    with contextlib.suppress(OSError, ValueError):
        found += sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task"))[:_MAX_THREADS]
    return found


# The server's threads the seccomp filter names at most (a compare each; a server has ~10)
_MAX_THREADS = 512


def _confine(plugin_dir: str, env: os._Environ[str]) -> tuple[dict[str, bool], bool]:
    """Confine this worker before it loads plugin code (the module docstring): what of it
    held (``isolation.MEASURES``), and whether it switched to the ``worker_user``. Raises
    OSError when its data dir cannot be prepared."""
    # A root server's worker runs as the user the server names (nobody), mapped too where
    # its namespaces are made in a user namespace (a root server without CAP_SYS_ADMIN).
    identity = _identity(env)
    private = env.get("MCP0_FILESYSTEM", "private") == "private"
    data_dir = Path(env.get("MCP0_DATA_DIR") or os.getcwd())
    if private and os.geteuid() == 0:
        # A data dir of another user (worker_user changed) goes back to root here, where
        # all users are mapped: in a user namespace root could not enter it
        ownership.reclaim(data_dir, identity)
    network_isolated = env.get("MCP0_NETWORK") != "1" and isolation.isolate_network(identity)
    memory_mb = int(env.get("MCP0_MEMORY_MB", "0"))
    if memory_mb > 0:
        isolation.apply_rlimits(memory_mb)
    read, write = _file_access(plugin_dir, env)
    protect = env.get("MCP0_PROTECT", "")
    # As that user, it must still reach its interpreter and code where they are below a
    # directory only root may search (a venv under /root): covered, with those put back.
    unsearchable = isolation.unsearchable([*read, *write], *identity) if identity else []
    # Mounts before Landlock, which forbids changing them; both while capabilities are held.
    mounts_confined = isolation.confine_mounts(
        write,
        cover=([protect] if protect else []) + unsearchable,
        keep=[*read, *write],
        # its own shared memory, not other plugins': as much as its memory quota (tmpfs
        # pages are not counted against RLIMIT_AS, so this is on top of it)
        private=[isolation.SHARED_MEMORY],
        private_mb=memory_mb if memory_mb > 0 else 256,
        owner=identity,
    )
    # Only with its mount view may it leave root: the plugin's copy is under the server's
    # 0700 data dir. Its data dir is made the user it runs as from now on before it
    # switches (while it holds CAP_CHOWN).
    switch = (
        identity is not None
        and (mounts_confined or not unsearchable)
        and isolation.can_become(*identity)
    )
    if private:
        ownership.settle(data_dir, identity if switch else None)
    if switch and identity is not None:
        isolation.drop_bounding_set()  # (needs CAP_SETPCAP, which the switch gives up)
        switch = isolation.become(*identity, int(env.get("MCP0_PARENT_PID", "0")))
        if not switch and private:  # (not foreseen): it stays root, so do its files
            ownership.settle(data_dir, None)
    if not switch and identity is not None and mounts_confined:
        # its own /dev/shm was made for that user: the user it stays is root
        with contextlib.suppress(OSError):
            os.chown(isolation.SHARED_MEMORY, os.geteuid(), os.getegid())
    # Landlock keeps the server's data dir out by itself too, on every mount of it (the
    # cover is on one: the same tree mounted elsewhere shows it again).
    files_confined = isolation.confine_files(read, write, hidden=protect) > 0
    # After unshare, which needs them: a root server's workers would hold them all, others
    # their user namespace's, or ambient ones a service manager granted.
    isolation.drop_capabilities()
    syscalls_restricted = isolation.restrict_syscalls(protected=_server(env))
    sandbox = {
        "network_isolated": network_isolated,
        "files_confined": files_confined,
        "mounts_confined": mounts_confined,
        # (its parent hidden tells for all only where Landlock keeps it from tracing the
        # processes of its own user: without, another plugin's child would show)
        "processes_hidden": mounts_confined and files_confined and isolation.processes_hidden(),
        "unprivileged": os.geteuid() != 0,
        "syscalls_restricted": syscalls_restricted,
    }
    return sandbox, bool(switch)


def _over_quota(message: str, memory_mb: int) -> str:
    """A MemoryError's ``message``, which says that the plugin reached its memory quota
    and what to do."""
    if memory_mb <= 0:  # (no quota: the machine's memory ran out)
        return message
    quota = (
        f"the plugin reached its memory quota ({memory_mb} MiB of address space): raise "
        "quotas.memory_mb in its plugin.json, or make it use less"
    )
    return f"{message}; {quota}" if message else quota


def _load_failure(exc: BaseException, switched: bool, memory_mb: int) -> str:
    """The load error the kernel shows; one that a switched worker could not read a file
    on its import path says why, one out of memory which quota it reached."""
    if isinstance(exc, MemoryError):
        return f"MemoryError: {_over_quota(str(exc), memory_mb)}"
    message = f"{type(exc).__name__}: {exc}"
    denied = str(getattr(exc, "filename", "") or "")
    on_path = bool(denied) and any(p and isolation.is_within(denied, p) for p in sys.path)
    if isinstance(exc, PermissionError) and switched and on_path:
        message += (
            f" (a root server's worker runs as uid {os.getuid()}, the worker_user "
            "setting: the interpreter and packages it imports must be readable by it, "
            "e.g. a venv made under umask 077 or 027 needs chmod -R a+rX)"
        )
    return message


def _as_batch_work() -> None:
    """Be scheduled as batch work (SCHED_BATCH; its threads and children inherit it, and may
    go back): a call's frame wakes this worker without preempting the server that sent it,
    which finishes what it was doing first. Measured at a paced 1,000 calls/s, the server
    was preempted 0.6 times a call otherwise (docs/architecture.md)."""
    with contextlib.suppress(AttributeError, OSError):  # (no such policy here: as it was)
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def _not_yours(number: int, frame: Any) -> None:
    """A stop signal for the server: it ends this worker when its calls are done."""


def main(argv: list[str] | None = None) -> int:
    """Worker entry point; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    env = os.environ
    plugin_dir = args[0] if args else env.get("MCP0_PLUGIN_DIR", "")
    entry = args[1] if len(args) > 1 else env.get("MCP0_PLUGIN_ENTRY", "")
    in_fd, out_fd = _isolate_stdio()
    isolation.tie_to_parent(int(env.get("MCP0_PARENT_PID", "0")))
    _as_batch_work()
    # The server ends its workers (their stdin closed, then SIGKILL): a stop signal sent to
    # every process of the service (systemd's KillMode=control-group) must not kill them
    # under the calls the server gives its grace to (found by review). A handler, not
    # SIG_IGN: what the plugin runs gets the default again at exec.
    for number in proctree.STOP_SIGNALS:
        signal.signal(number, _not_yours)
    try:
        sandbox, switched = _confine(plugin_dir, env)
    except OSError as exc:  # (its data dir could not be prepared, say)
        return _fatal(out_fd, f"its sandbox could not be set up: {exc}")
    # Told before the plugin's code runs, which could rewrite a later frame (its import
    # patched Worker.send to claim every measure held: found by review).
    write_all(out_fd, encode_frame({"op": "confined", "sandbox": sandbox}))
    memory_mb = int(env.get("MCP0_MEMORY_MB", "0"))
    try:
        plugin = load_plugin(plugin_dir, entry)
        # (from its plugin.json, which the server checked: in an environment variable, a
        # plugin of many resources passed the 128 KiB one may hold, and no worker started:
        # found by review)
        manifest = decode(Path(plugin_dir, "plugin.json").read_bytes())
        plugin.declare_mime_types(declared_mime_types(manifest))
    except BaseException as exc:  # report any load failure to the kernel, then exit
        traceback.print_exc(file=sys.stderr)
        proctree.kill_tree(os.getpid(), include_root=False)  # what its import started
        return _fatal(out_fd, _load_failure(exc, switched, memory_mb))
    worker = Worker(
        plugin,
        out_fd,
        Path(env.get("MCP0_DATA_DIR") or os.getcwd()),
        int(env.get("MCP0_MAX_THREADS", "8")),
        memory_mb,
    )
    ready = {
        "op": "ready",
        "pid": os.getpid(),
        "tools": sorted(plugin.tools),
        "resources": sorted(plugin.resources),
        "templates": sorted(t.template for t in plugin.templates),
        "prompts": sorted(plugin.prompts),
    }
    try:
        import uvloop  # faster frame handling when the server's extras are installed

        uvloop.run(worker.serve(in_fd, ready))
    except ImportError:
        asyncio.run(worker.serve(in_fd, ready))
    sys.stderr.flush()
    # Nothing the plugin started outlives its worker: what is still below it ends here (what
    # it orphaned went to the server, which sweeps it).
    proctree.kill_tree(os.getpid(), include_root=False)
    # Handler threads may still be blocked in plugin code: do not wait for them.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
