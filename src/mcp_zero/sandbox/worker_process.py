"""The kernel's side of one worker process: start it, send calls, route its frames.

One :class:`WorkerProcess` owns one child (see :mod:`mcp_zero.sandbox.worker`
for the protocol). Frames are parsed straight from the pipe callbacks, calls
are futures keyed by id, and the wall-clock limit is a timer per call — no
task or process per call. When the child dies every call in flight fails with
:class:`~mcp_zero.errors.PluginCrashed`; replacing it is the runtime's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import os
import re
import resource
import signal
import subprocess
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

from mcp_zero.errors import (
    InvalidParams,
    McpZeroError,
    PluginCrashed,
    PluginFailure,
    PluginLoadFailure,
    QuotaExceeded,
    ToolTimeout,
)
from mcp_zero.sandbox import leftovers, proctree
from mcp_zero.sandbox.base import (
    LOG_LEVELS,
    REQUEST_HOLDS_THREAD,
    TIMEOUT_HINT,
    CallBridge,
    seconds,
)
from mcp_zero.sandbox.frames import (
    MAX_FRAME_BYTES,
    MAX_NOTIFICATION_BYTES,
    MAX_READ_DEPTH,
    LineSplitter,
    decode,
    encode,
    frame_values,
)
from mcp_zero.sandbox.isolation import MEASURES
from mcp_zero.sandbox.stderr import StderrBudget

JSON = dict[str, Any]
_STDERR_TAIL_LINES = 40
#: What orjson's ValueError says when it had no memory to parse a frame (a MemoryError).
_DECODER_NO_MEMORY = "Not enough memory"
#: A frame's call, in its first ``_HEAD_BYTES``: ``{"id":N`` for its answer (group 1),
#: ``{"op":"…","call":N`` for what it sends meanwhile (groups 2 and 3), a request's own id next
#: (``,"id":R``, group 4). So the worker writes them; spaces allowed (a plugin's JSON).
_FRAME_HEAD = re.compile(
    rb'\{\s*"(?:id"\s*:\s*(\d+)|op"\s*:\s*"(\w+)"\s*,\s*"call"\s*:\s*(\d+)'
    rb'(?:\s*,\s*"id"\s*:\s*(\d+))?)'
)
_HEAD_BYTES = 128
_NOTIFICATIONS = frozenset((b"progress", b"log", b"close_stream", b"resource_updated"))
_MAX_STRAYS_PER_S = 1000  # frames for no call in flight a worker may send in a second
_MAX_STRAY_BYTES_PER_S = 8 << 20  # and bytes: what 1,000 updates of 8 KiB URIs make
#: The most values (arrays, objects, their members) a frame over ``_COUNTED_FRAME_BYTES`` may
#: hold, counted before it is parsed: about 75 MB of objects at most (a smaller frame cannot
#: make that many). One 31 MiB answer of ``{}`` items made 1 GB of them.
MAX_FRAME_VALUES = 1_000_000
_COUNTED_FRAME_BYTES = 1 << 20
#: Requests to its client (sampling, elicitation, roots) one call may have open at once, and
#: make in all. Each relayed one is decided and audited: a plugin writing request frames in a
#: loop left 20,000 records of one call in 4 s (found by review). Past either, its request is
#: answered with an error at once, neither relayed nor audited.
MAX_OPEN_CLIENT_REQUESTS = 16
MAX_CLIENT_REQUESTS = 1000
_STDERR_LINE_BYTES = 8 * 1024  # a longer stderr line is kept and logged in pieces this big
# A worker's stderr over its budget is read at most a pipe's worth (64 KiB) this often, the
# time the budget takes to refill a line (stderr.LINES_PER_S): its writes wait meanwhile.
_STDERR_PAUSE_S = 0.1
# How long a worker's exit waits for the rest of a stderr read with pauses (its last words)
_LAST_WORDS_S = 0.5
# A worker's stdout ends as it exits, a moment before its exit is reported: one still running
# this long after closed its stdout itself, and can answer no call.
_STDOUT_CLOSED_GRACE_S = 0.2
# What one read of a worker's answers' pipe takes at most; a held one's, when its batch commits
# (the rest is read as usual)
_TAKE_IN_BYTES = 256 * 1024
# ...and when its call's time limit fires or it exits: more than a pipe holds, so that a
# whole answer (or the end of file) is found, but never without end (a child it left could
# write for ever: it is killed instead)
_TAKE_IN_ALL_BYTES = 4 << 20


#: Worker pids of this process that have not exited, so that a sweep of orphans never
#: takes a worker (nor sweeps while one starts, its pid not known yet).
_LIVE: set[int] = set()
_starting = [0]
_ticking: list[asyncio.AbstractEventLoop | None] = [None]  # the loop whose ticks run
_subreaper = [False]
_SWEEP_DELAY_S = 0.1  # after a worker exits: the kernel re-parents what it left meanwhile
# a subreaper's sweeps, and the touches of the workers' record, come every second
_TICK_S = leftovers.HEARTBEAT_S
_sweep_log = logging.getLogger("mcp_zero.sandbox.proctree")
_log = logging.getLogger(__name__)
#: Where this process lists its workers, if it does (a server: ``record_workers``), and them.
_record: list[leftovers.WorkerRecord | None] = [None]
_RECORDED: dict[int, leftovers.Worker] = {}


def adopt_orphans() -> bool:
    """Make this process (the server) a child subreaper, so that processes orphaned below
    its workers come to it and are swept (see :mod:`~mcp_zero.sandbox.proctree`): reaped,
    left to their worker, or killed. ``True`` if that worked. For a server's process only:
    it starts no other processes than workers."""
    _subreaper[0] = proctree.become_subreaper()
    return _subreaper[0]


def record_workers(directory: Path) -> None:
    """List this process's workers in a file in ``directory`` from now on, so that the next
    server on the data dir can end what they leave if this one is killed (see
    :mod:`~mcp_zero.sandbox.leftovers`). For a server's process."""
    _record[0] = leftovers.WorkerRecord(directory)


def _rewrite_record(record: leftovers.WorkerRecord) -> None:
    try:
        record.write(list(_RECORDED.values()))
    except OSError as exc:  # (a full disk): the workers run all the same
        _sweep_log.warning("cannot list the running workers in %s: %s", record.path, exc)


def _keep_ticking(loop: asyncio.AbstractEventLoop) -> None:
    """Every second on ``loop`` (once started, for the loop's life): in a subreaper, sweep;
    with a record of the workers, touch it (what starts in a worker's session after the
    touches stop is no leftover of this server: see ``sandbox.leftovers``)."""
    if (_subreaper[0] or _record[0] is not None) and _ticking[0] is not loop:
        _ticking[0] = loop
        loop.call_later(_TICK_S, _tick, loop)


def _tick(loop: asyncio.AbstractEventLoop) -> None:
    if _ticking[0] is loop and not loop.is_closed():
        if _subreaper[0]:
            _sweep()
        record = _record[0]
        if record is not None and _RECORDED:
            record.touch()
        loop.call_later(_TICK_S, _tick, loop)


def _sweep() -> None:
    """Reap the zombies this process adopted, and kill the strays (see ``adopted``). Which
    processes they are is decided here, on the loop that starts workers, and never while one
    starts; the killing, which may wait on a process in uninterruptible sleep, in a thread."""
    if _starting[0]:
        return  # the next sweep will do
    found = proctree.adopted(_LIVE)
    proctree.reap(found.zombies)
    if found.strays or found.groups:
        try:
            asyncio.get_running_loop().run_in_executor(None, _end_strays, found)
        except RuntimeError:  # the server is stopping (no executor): here, then
            _end_strays(found)


def _end_strays(found: proctree.Adopted) -> None:
    roots = found.strays
    # Their groups first, whole: a stray that forks and exits in a loop has its child
    # re-parented here before its tree can be walked, but the child keeps the group
    groups = proctree.kill_groups(found.groups, _LIVE)
    killed = [pid for root in roots for pid in proctree.kill_tree(root, include_root=True)]
    if roots or groups:
        _sweep_log.warning(
            "killed %d process(es) a plugin left outside its worker's process group, or "
            "behind a worker that is gone, and process groups %s: %s",
            len(roots),
            groups,
            sorted({*roots, *killed}),
        )
    proctree.reap(roots, wait=1.0)  # the next sweep reaps what took longer to die


def end_adopted() -> None:
    """Once a server's workers are gone: kill and reap every process it adopted (what a
    plugin left running in its worker's group lived as long as the worker did)."""
    if not _subreaper[0]:
        return
    found = proctree.adopted(())
    proctree.reap(found.zombies)
    _end_strays(found)


def _end_tree(pid: int) -> None:
    """Kill a worker and everything below it; what it orphaned earlier is the server's to
    sweep (or, in a process that is no subreaper, init's)."""
    proctree.kill_tree(pid, include_root=True)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class _Call:
    """One call in flight."""

    __slots__ = (
        "asked",
        "bridge",
        "chain",
        "future",
        "label",
        "late",
        "progressed",
        "refused",
        "requests",
        "sent",
        "updates",
    )

    def __init__(self, future: asyncio.Future[JSON], bridge: CallBridge | None, label: str):
        self.sent = time.monotonic()
        self.future = future
        self.bridge = bridge
        self.label = label
        # The last progress/log relay; each awaits the one before, so order holds.
        self.chain: asyncio.Task[None] | None = None
        # Its requests to the client being relayed (made at the first: most calls ask none),
        # how many it made, and whether one was refused for the limits (logged once a call)
        self.requests: set[asyncio.Task[None]] | None = None
        self.asked = 0
        self.refused = False
        # The resources whose update waits in the chain, not yet begun (as ``requests``).
        self.updates: set[str] | None = None
        # The last progress relayed: MCP has each notification's progress increase
        self.progressed: float | None = None
        # Its answer, when it came after its future was cancelled (its caller's cancel was
        # on its way to it): the handler had finished, which the caller is then told.
        self.late: JSON | None = None

    def answer(self) -> JSON | None:
        """What the worker answered, if it did."""
        future = self.future
        if future.done() and not future.cancelled() and future.exception() is None:
            return future.result()
        return self.late


async def _tell_updated(bridge: CallBridge, waiting: set[str], uri: str) -> None:
    """Tell the subscribers of ``uri`` that it changed (a call's update, its turn come)."""
    waiting.discard(uri)  # a change from now on is one they have not heard of
    await bridge.resource_updated(uri)


class _Abandoned:
    """A call whose caller has its answer while its handler, told to stop, runs on."""

    __slots__ = ("ended", "kill")

    def __init__(self, kill: asyncio.TimerHandle, ended: Callable[[], None]) -> None:
        self.kill = kill  # (the worker's, if the handler has not stopped by then)
        self.ended = ended  # ends the call's hold on its plugin (CallBridge.handler_runs_on)


class WorkerOutputs:
    """The answers' pipes of one loop's plugin workers, which its audit log holds while a
    batch gathers (:class:`mcp_zero.audit.log.Gatherer`): what they answer meanwhile is left
    unread, and taken in just before the batch commits. A worker that gets a call while they
    are held is held too."""

    __slots__ = ("_held", "_queued", "_workers", "held", "on_call", "quick_s")

    def __init__(self) -> None:
        self._workers: dict[WorkerProcess, None] = {}  # (ordered: taken in as they started)
        self._held: list[WorkerProcess] = []  # those whose pipe is paused now
        self.held = False
        self._queued = 0  # calls waiting for a plugin's slot: nothing is held meanwhile
        #: Told of each call sent (the audit log's ``expect``, which holds them: the
        #: call's answer is taken in with its batch; or lets them go)
        self.on_call: Callable[[], None] | None = None
        #: A worker whose last answer took longer than this (the window) is not worth a
        #: window of its own: its answer would come after it closed, a wake-up for nothing.
        self.quick_s = 0.0

    def add(self, worker: WorkerProcess) -> None:
        self._workers[worker] = None

    def discard(self, worker: WorkerProcess) -> None:
        self._workers.pop(worker, None)

    def called(self, worker: WorkerProcess) -> None:
        """``worker`` was sent a call: held with the others, if they are (or now are)."""
        if self._queued:
            return
        if self.on_call is not None and worker.last_answer_s <= self.quick_s:
            self.on_call()
        if self.held:
            self._hold(worker)

    @contextlib.contextmanager
    def queued(self) -> Iterator[None]:
        """A call waits for a plugin's slot, which a held answer would free: while any
        does, nothing is held (at a load that fills a plugin's slots the loop is awake
        anyway), and what was is taken in now. Without this, a plugin's slots stayed taken
        until the window closed: a plugin of ``max_concurrency`` 1 ran one call a window."""
        self._queued += 1
        try:
            if self.held:
                self.release(take_in=True)
            yield
        finally:
            self._queued -= 1

    def hold(self) -> None:
        if self._queued:
            return
        self.held = True
        for worker in self._workers:
            if worker._calls:
                self._hold(worker)

    def _hold(self, worker: WorkerProcess) -> None:
        if worker.holdable() and worker.hold_output():
            self._held.append(worker)

    def release(self, take_in: bool) -> bool:
        self.held = False
        held, self._held = self._held, []
        took = False
        for worker in held:
            try:
                took = worker.release_output(take_in) or took
            except Exception:  # (one worker's failure leaves none of the others held, nor it)
                _log.exception("letting go of plugin %r's answers failed", worker.plugin)
                worker.resume_output()
        return took


_outputs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WorkerOutputs] = (
    weakref.WeakKeyDictionary()
)


def worker_outputs() -> WorkerOutputs:
    """The answers' pipes of the running loop's workers."""
    loop = asyncio.get_running_loop()
    found = _outputs.get(loop)
    if found is None:
        found = _outputs[loop] = WorkerOutputs()
    return found


def _holds_nothing() -> None:
    """A call without a bridge (a completion) holds nothing that waits for its handler."""


class WorkerProcess:
    """One running worker. Create, ``await start()``, then ``await call(...)`` concurrently.

    ``on_exit`` runs once when the child has gone; ``on_retire`` when the child asks
    to be replaced (it then finishes its calls and exits); ``on_update`` with the URI of a
    resource update the plugin sent outside any call (a watcher, a background job). Its
    stderr is logged within ``stderr_budget`` (the plugin's, shared by its workers; one of
    its own if None).
    """

    def __init__(
        self,
        plugin: str,
        argv: list[str],
        env: dict[str, str],
        cwd: Path,
        *,
        cancel_grace: float,
        on_exit: Callable[[WorkerProcess], None],
        on_retire: Callable[[WorkerProcess], None],
        on_update: Callable[[str], None] | None = None,
        stderr_budget: StderrBudget | None = None,
    ) -> None:
        self.plugin = plugin
        self.pid = 0
        self.alive = False
        self.retiring = False
        self.started_at = 0.0
        self.returncode: int | None = None
        self.sandbox: dict[str, bool] = {}  # what of its confinement held (isolation.MEASURES)
        self._argv = argv
        self._env = env
        self._cwd = cwd
        self._grace = cancel_grace
        self._on_exit = on_exit
        self._on_retire = on_retire
        self._on_update = on_update
        self._calls: dict[int, _Call] = {}
        self._zombies: dict[int, _Abandoned] = {}
        self._ids = itertools.count(1)
        self._stderr: deque[bytes] = deque(maxlen=_STDERR_TAIL_LINES)  # also lines not logged
        self._stderr_partial = b""
        self._stderr_pipe: asyncio.ReadTransport | None = None
        self._stderr_resume: asyncio.TimerHandle | None = None
        self._log = logging.getLogger(f"mcp_zero.sandbox.plugin.{plugin}")
        self._stderr_budget = stderr_budget or StderrBudget(self._log)
        self._transport: asyncio.SubprocessTransport | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[JSON] | None = None
        self._exited: asyncio.Future[None] | None = None
        self._stdout_open = True
        # stderr: open until its end; its last words are awaited (at most _LAST_WORDS_S)
        # once the worker exited, when it was read with pauses (what was unread is the end)
        self._stderr_open = True
        self._stderr_paused_once = False
        self._last_words_due: asyncio.TimerHandle | None = None
        self._process_running = True
        self._kill_reason: str | None = None
        # frames for no call, since when, their bytes (_stray)
        self._strays: list[float] = [0, 0.0, 0]
        self._ending_tree = False
        # Its answers' pipe is read here, not by a transport: what is read reaches its frames
        # at once (a transport hands it over a loop turn later), and a held pipe leaves the
        # loop's poll at once (uvloop's paused transport woke the loop once more per hold)
        self._stdout_fd = -1  # (-1: not open, or read to its end)
        self._reading = False  # its loop watches it
        self._pipes = _Pipes(self)
        self._outputs: WorkerOutputs | None = None
        self._output_held = False
        self._taking_in = False
        self._held_since = 0.0
        self.last_answer_s = 0.0  # how long its last answer took (0: it came within a window)

    @property
    def inflight(self) -> int:
        """Calls sent and not yet answered."""
        return len(self._calls)

    def stderr_tail(self) -> str:
        """The last lines the worker wrote to stderr (plugin prints, tracebacks)."""
        return "\n".join(raw.decode("utf-8", "replace") for raw in self._stderr)

    # -- lifecycle ------------------------------------------------------------

    async def start(self, timeout: float) -> JSON:
        """Spawn the child and wait for its ``ready`` frame, which is returned.

        Raises :class:`PluginFailure` when it fails to load the plugin, exits, or
        is not ready within ``timeout`` seconds. Cancelled, it kills the child and waits
        for it to go before it raises CancelledError.
        """
        loop = self._loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._exited = loop.create_future()
        self.started_at = time.monotonic()
        _starting[0] += 1
        try:
            self._stdout_fd, child_stdout = os.pipe2(os.O_CLOEXEC)
        except OSError as exc:
            _starting[0] -= 1
            raise PluginFailure(
                f"plugin '{self.plugin}': cannot start a worker: {spawn_failure(exc)}"
            ) from exc
        pipes = self._pipes
        try:
            os.set_blocking(self._stdout_fd, False)
            transport, _ = await loop.subprocess_exec(
                lambda: pipes,
                *self._argv,
                stdin=subprocess.PIPE,
                stdout=child_stdout,
                stderr=subprocess.PIPE,
                env=self._env,
                cwd=str(self._cwd),
                start_new_session=True,  # own process group: one killpg takes its children too
            )
        except BaseException as exc:
            self._stdout_ended(tell=False)
            if isinstance(exc, OSError):
                raise PluginFailure(
                    f"plugin '{self.plugin}': cannot start a worker: {spawn_failure(exc)}"
                ) from exc
            raise
        finally:
            _starting[0] -= 1
            os.close(child_stdout)
        self._transport = transport
        self.pid = transport.get_pid()
        if self._process_running:  # (it may have exited already: then it is no worker)
            _LIVE.add(self.pid)
            self._list_in_record()
        _keep_ticking(loop)
        # uvloop's pipe transports do not subclass asyncio's, but they quack alike.
        self._stdin = cast(asyncio.WriteTransport, transport.get_pipe_transport(0))
        self._stderr_pipe = cast(asyncio.ReadTransport, transport.get_pipe_transport(2))
        self.resume_output()
        if self._process_running:
            self._outputs = worker_outputs()
            self._outputs.add(self)
        else:  # its exit came as it spawned, when the pipe's other end was still ours too
            self.on_process_exited()
        try:
            async with asyncio.timeout(timeout):
                ready = await self._ready
        except TimeoutError:
            self.kill("it was not ready in time")
            await self.wait_gone()
            raise PluginFailure(
                f"plugin '{self.plugin}': worker not ready within {seconds(timeout)} s; "
                f"its stderr: {self._last_words()}"
            ) from None
        except asyncio.CancelledError:
            # Its plugin was removed or replaced while it loaded: nobody will use this child.
            self.kill("its start was cancelled")
            await self.wait_gone()
            raise
        self.alive = True
        return ready

    def _list_in_record(self) -> None:
        """List this worker in the record of the workers, if this process keeps one: before
        it loads its plugin, which may start processes."""
        record = _record[0]
        proc = None if record is None else proctree.process(self.pid)
        if record is None or proc is None:  # (none kept; or the worker is gone already)
            return
        uids = {os.geteuid()}
        if "MCP0_WORKER_UID" in self._env:  # (a root server's: the user it switches to)
            uids.add(int(self._env["MCP0_WORKER_UID"]))
        _RECORDED[self.pid] = leftovers.Worker(self.pid, proc.started, tuple(sorted(uids)))
        _rewrite_record(record)

    def kill(self, reason: str) -> None:
        """SIGKILL the worker and everything it started; calls in flight fail with
        PluginCrashed."""
        if self._kill_reason is None:
            self._kill_reason = reason
        if self.pid and self._process_running:
            if self._ending_tree:
                return
            self._ending_tree = True
            try:  # in a thread: stopping a process that is in uninterruptible sleep waits
                assert self._loop is not None
                self._loop.run_in_executor(None, _end_tree, self.pid)
            except RuntimeError:  # the loop is closing: its executor takes no more
                _end_tree(self.pid)
        elif self.pid and self._stdout_open:
            # Once the worker itself has exited: a child it forked may still hold the group,
            # and its pipes (the group is ours while any member is left in it).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    def retire(self) -> None:
        """Exit once the calls in flight are answered (end of stdin then); take no more."""
        self.retiring = True
        self._close_if_retired()

    async def wait_gone(self) -> None:
        """Wait until the child has exited and its pipes are closed (after :meth:`kill`)."""
        if self._transport is not None and self._exited is not None:
            await asyncio.shield(self._exited)

    async def close(self, grace: float = 1.0) -> None:
        """Ask the worker to exit (end of its stdin); kill it if it lingers past ``grace``."""
        if self._exited is None:
            return
        self._kill_reason = self._kill_reason or _CLOSED
        if self._stdin is not None:
            self._stdin.close()
        try:
            async with asyncio.timeout(grace):
                await asyncio.shield(self._exited)
        except TimeoutError:
            self.kill("it did not exit when closed")
            await asyncio.shield(self._exited)

    # -- calls ----------------------------------------------------------------

    async def call(
        self, frame: JSON, bridge: CallBridge | None, timeout: float, label: str
    ) -> JSON:
        """Send a call frame and return the worker's response frame.

        Raises :class:`ToolTimeout` after ``timeout`` seconds (the worker is told to
        cancel and is killed if the handler does not stop within the grace), and
        :class:`PluginCrashed` if the worker dies first. Cancelled, the worker is told to
        cancel, and killed only if the handler runs past ``timeout`` and the grace.
        """
        if not self.alive:
            raise PluginCrashed(f"plugin '{self.plugin}': worker is not running")
        assert self._loop is not None
        call_id = next(self._ids)
        frame["id"] = call_id
        fut: asyncio.Future[JSON] = self._loop.create_future()
        call = _Call(fut, bridge, label)
        self._calls[call_id] = call
        try:
            self._send(frame)
            if self._outputs is not None:
                self._outputs.called(self)
        except TypeError:  # nested deeper than a frame carries (orjson: 254 levels)
            del self._calls[call_id]
            raise InvalidParams(
                f"{call.label}: its parameters nest too deep to be passed to the plugin "
                "(arguments: at most 253 levels)"
            ) from None
        timer = self._loop.call_later(timeout, self._timed_out, call_id, timeout)
        try:
            reply = await fut
        except asyncio.CancelledError:
            # Our caller gave up (client cancelled). What the worker answered meanwhile is
            # read first (held while a batch gathers, or not read yet): if the handler had
            # finished, its answer whole by now, the cancel stopped nothing, and the caller is
            # told what it did (its record says so; MCP lets a server answer a request whose
            # processing completed). Every cancel is withdrawn, as the kernel withdraws those
            # that come once an action has its outcome (``uncancellable``): no caller may
            # wrap this in a timeout scope, whose own cancel would be withdrawn too.
            self._take_in(_TAKE_IN_ALL_BYTES)
            task = asyncio.current_task()
            answered = call.answer()
            if answered is not None and task is not None and self._calls.get(call_id) is None:
                while task.cancelling():
                    task.uncancel()
                reply = answered
            else:
                # The handler is told to stop, but not killed sooner than a timeout kills
                # it, with the worker and the other calls on it, which may be other agents'
                # (found by review)
                if self._calls.pop(call_id, None) is not None:
                    self._abandon(
                        call_id,
                        call,
                        max(timer.when() - self._loop.time(), 0.0) + self._grace,
                        f"{call.label} was cancelled and still ran {self._grace:g} s past its "
                        f"time limit ({seconds(timeout)} s)",
                    )
                raise
        finally:
            timer.cancel()
        if call.chain is not None:
            await call.chain  # progress/log sent before the result reach the client first
        return reply

    def holdable(self) -> bool:
        """Not held already, nor in the middle of a frame: the rest of a large answer is read
        at once (held, it came a take-in per window)."""
        return not (self._output_held or self._pipes.partial())

    def hold_output(self) -> bool:
        """Leave what the worker answers unread (its loop's audit batch gathers): whether it
        is held now."""
        if self._output_held:
            return True
        if not self._reading or not self._process_running or self._loop is None:
            return False
        self._loop.remove_reader(self._stdout_fd)
        self._reading = False
        self._output_held = True
        self._held_since = time.monotonic()
        return True

    def release_output(self, take_in: bool) -> bool:
        """Read what the worker answers again; with ``take_in``, first take in what it sent
        meanwhile, up to ``_TAKE_IN_BYTES`` (the rest, and its end of file, are read as
        usual). True when something was taken in."""
        if not self._output_held:
            return False
        took = take_in and self._take_in(_TAKE_IN_BYTES)[0]
        self.resume_output()
        return took

    def resume_output(self) -> None:
        """Read what the worker answers again, whatever held it (until its end of file)."""
        self._output_held = False
        loop = self._loop
        if self._stdout_fd >= 0 and not self._reading and loop and not loop.is_closed():
            loop.add_reader(self._stdout_fd, self._readable)
            self._reading = True

    def _readable(self) -> None:
        """What the worker answered can be read (its loop's callback): one read, as a
        transport does."""
        try:
            data = os.read(self._stdout_fd, _TAKE_IN_BYTES)
        except BlockingIOError:
            return
        except OSError:  # (its end, with an error)
            data = b""
        if data:
            self._feed(data)
        else:
            self._stdout_ended()

    def _take_in(self, limit: int) -> tuple[bool, bool]:
        """Read now, up to ``limit`` bytes, what the worker sent and feed it to its frames:
        whether something was read, and whether its end of file was reached (which its
        loop's reader finds again, if the pipe is watched)."""
        took = False
        self._taking_in = self._output_held
        try:
            while limit > 0 and self._stdout_fd >= 0:
                try:
                    data = os.read(self._stdout_fd, min(limit, _TAKE_IN_BYTES))
                except BlockingIOError:  # (nothing more for now)
                    return took, False
                except OSError:  # (its end, with an error)
                    return took, True
                if not data:
                    return took, True
                took = True
                limit -= len(data)
                if not self._feed(data):
                    return took, False
        finally:
            self._taking_in = False
        return took, False

    def _feed(self, data: bytes) -> bool:
        """Hand what was read to the frames: False when that failed (logged; the worker is
        ended, its calls failing, rather than left half read)."""
        try:
            self._pipes.frames(data)
        except Exception:
            self._log.exception("reading what the worker answered failed")
            self.kill("what it answered could not be read")
            return False
        return True

    def _stdout_ended(self, tell: bool = True) -> None:
        """Its answers' pipe was read to its end (or could not be read on): closed here."""
        fd, self._stdout_fd = self._stdout_fd, -1
        if fd < 0:
            return
        if self._reading and self._loop is not None:
            self._reading = False
            if not self._loop.is_closed():
                self._loop.remove_reader(fd)
        os.close(fd)
        if tell:
            self.on_stdout_closed()

    def _send(self, frame: JSON) -> None:
        if self._stdin is not None and not self._stdin.is_closing():
            self._stdin.write(encode(frame))

    def _timed_out(self, call_id: int, timeout: float) -> None:
        # Its answer may be waiting in the pipe (held, or not yet seen): it came in time
        self._take_in(_TAKE_IN_ALL_BYTES)
        call = self._calls.pop(call_id, None)
        if call is None:
            return
        self._abandon(call_id, call)
        if not call.future.done():  # (cancelled in this turn, its caller not yet told)
            call.future.set_exception(
                ToolTimeout(
                    f"{call.label} of plugin '{self.plugin}' did not finish within "
                    f"{seconds(timeout)} s; {TIMEOUT_HINT}"
                )
            )

    def _abandon(
        self, call_id: int, call: _Call, kill_in: float | None = None, why: str = ""
    ) -> None:
        """Tell the handler of a call its caller has given up to stop; kill the worker if it
        has not in ``kill_in`` seconds (``why``; by default, the grace: it ignored the
        cancel). Until it stops, its call keeps its hold on the plugin."""
        for task in call.requests or ():
            task.cancel()
        self._send({"op": "cancel", "id": call_id})
        assert self._loop is not None
        if kill_in is None:
            kill_in, why = self._grace, f"{call.label} ignored cancellation for {self._grace:g} s"
        ended = call.bridge.handler_runs_on() if call.bridge is not None else _holds_nothing
        self._zombies[call_id] = _Abandoned(self._loop.call_later(kill_in, self.kill, why), ended)
        self._close_if_retired()

    def _close_if_retired(self) -> None:
        if self.retiring and not self._calls and not self._zombies and self._stdin is not None:
            self._stdin.close()

    # -- frames from the worker -----------------------------------------------

    def on_line(self, line: bytes) -> None:
        """Route one frame from the worker. Its head, which names its call, is read first: a
        frame no call waits for, and a notification over its size, are dropped unparsed (a
        plugin thread writing 31 MiB frames for no call stalled the loop for seconds), and a
        large one is parsed only if it holds few enough values (``_too_many_values``)."""
        try:
            head = _FRAME_HEAD.match(line, 0, _HEAD_BYTES)
            if head is None:
                self._on_headless(line)
            elif head[1] is not None:
                self._on_response(int(head[1]), line)
            elif head[2] == b"request":
                self._on_request(int(head[3]), head[4], line)
            elif head[2] in _NOTIFICATIONS:
                self._on_notification(head[2].decode(), int(head[3]), line)
            else:
                self._on_headless(line)
        except MemoryError:
            self.no_room(line, len(line))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            if str(exc).startswith(_DECODER_NO_MEMORY):  # orjson's MemoryError, as ValueError
                self.no_room(line, len(line))
                return
            self._log.error("worker %d broke the protocol: %s", self.pid, exc)
            self.kill(f"it broke the frame protocol ({exc})")

    def _on_headless(self, line: bytes) -> None:
        """A frame whose head names no call as the worker writes one: its hello and retire
        frames, or one a plugin wrote otherwise (parsed if small, as the worker's would be)."""
        if len(line) > MAX_NOTIFICATION_BYTES and self._ready is not None and self._ready.done():
            raise ValueError(f"a frame of {len(line)} bytes that begins as none of its kind do")
        values = _too_many_values(line)
        if values:  # (a ready frame, the only large one)
            raise ValueError(f"a frame of {values} values, over the {MAX_FRAME_VALUES} it may hold")
        frame = decode(line)
        op = frame.get("op")
        if op is None:
            self._on_response(int(frame["id"]), line, frame)
        elif op in ("progress", "log", "close_stream", "resource_updated"):
            self._on_notification(op, int(frame["call"]), line, frame)
        elif op == "request":
            self._on_request(int(frame["call"]), None, line, frame)
        elif op == "confined" or op == "ready" or op == "fatal":
            self._on_hello(op, frame)
        elif op == "retire":
            self._log.warning("worker %d asks to be replaced: %s", self.pid, frame.get("reason"))
            self.retiring = True
            self._on_retire(self)
            self._close_if_retired()
        else:
            raise ValueError(f"unknown op {op!r}")

    def no_room(self, frame: bytes, size: int) -> None:
        """The server had no memory for a frame of the worker (``size`` bytes, starting with
        ``frame``): not the worker's fault (it is kept); the call the frame belongs to fails,
        as it would miss what it was sent."""
        head = _FRAME_HEAD.match(frame, 0, _HEAD_BYTES)
        call_id = int(head[1] or head[3]) if head else 0  # (call ids count from 1)
        self._log.error(
            "out of memory reading a frame of %d bytes from worker %d (call %d); the worker "
            "is kept, the call fails",
            size,
            self.pid,
            call_id,
        )
        call = self._calls.pop(call_id, None)
        if call is None:
            return
        if head and head[1] is None:  # the call runs on (the frame was not its answer): stop it
            self._abandon(call_id, call)
        if not call.future.done():
            call.future.set_exception(
                McpZeroError(
                    f"{call.label} of plugin '{self.plugin}' failed: mcp0 serve ran out of "
                    f"memory reading the {size} bytes the plugin sent (the server's "
                    "memory, not the plugin's fault); give the server more memory or make "
                    "the result smaller"
                )
            )

    def _on_response(self, call_id: int, line: bytes, frame: JSON | None = None) -> None:
        """The answer to call ``call_id`` (``frame``, if it was parsed already): parsed only
        when the call waits for it."""
        call = self._calls.get(call_id)
        if call is None:
            zombie = self._zombies.pop(call_id, None)
            if zombie is not None:  # the abandoned handler did stop: no need to kill
                zombie.kill.cancel()
                zombie.ended()
            else:
                self._stray(len(line))
            self._close_if_retired()
            return
        # (a call of its own only for a large answer: this runs for every call)
        values = _too_many_values(line) if len(line) > _COUNTED_FRAME_BYTES else 0
        if values:
            # One 31 MiB answer of {} items took the server from 56 MB to 1.08 GB as it was
            # parsed (found by review)
            self._log.warning(
                "worker %d answered %s with a frame of %d bytes holding %d values, over the "
                "%d one may hold: refused unparsed",
                self.pid,
                call.label,
                len(line),
                values,
                MAX_FRAME_VALUES,
            )
            message = (
                f"its answer holds {values:,} values (arrays, objects and their members), "
                f"over the {MAX_FRAME_VALUES:,} an answer over 1 MiB may hold: send large "
                "data as text or a blob"
            )
            frame = {"id": call_id, "error": {"kind": "failed", "message": message}}
        elif frame is None:
            frame = decode(line)
        if len(line) > 2 * MAX_READ_DEPTH and _too_deep(line, frame):
            # The client's answer could not be written (HTTP 500, a stream cut, a stdio
            # request never answered) while its record said allowed (found by review)
            self._log.warning(
                "worker %d answered %s with a frame nested deeper than %d levels: refused",
                self.pid,
                call.label,
                MAX_READ_DEPTH,
            )
            message = (
                f"its result nests deeper than {MAX_READ_DEPTH - 1} levels, more than an "
                "answer to the client can carry"
            )
            frame = {"id": call_id, "error": {"kind": "failed", "message": message}}
        del self._calls[call_id]
        # One taken in came by the time it was held, at the latest (its held wait does not
        # count: found by review)
        end = self._held_since if self._taking_in else time.monotonic()
        self.last_answer_s = max(end - call.sent, 0.0)
        if not call.future.done():
            call.future.set_result(frame)
        else:  # (cancelled: its caller's cancel is on its way to it)
            call.late = frame
        if self.retiring:
            self._close_if_retired()

    def _on_notification(
        self, op: str, call_id: int, line: bytes, frame: JSON | None = None
    ) -> None:
        """A notification of call ``call_id`` (``frame``, if it was parsed already): parsed
        only when it is relayed, or is a resource update (told whenever it comes)."""
        call = self._calls.get(call_id)
        if len(line) > MAX_NOTIFICATION_BYTES:  # (the worker refuses to send those)
            self._log.warning(
                "worker %d sent a %s frame of %d bytes, over the %d a notification may have: "
                "not relayed",
                self.pid,
                op,
                len(line),
                MAX_NOTIFICATION_BYTES,
            )
            self._stray(len(line))
            return
        if call is None:
            self._stray(len(line))  # (an update too: a flood of frames for no call is a runaway)
            if op != "resource_updated":
                return
        if frame is None:
            frame = decode(line)
        if op == "resource_updated" and (call is None or call.bridge is None):
            # A resource's subscribers are not the call's: its plugin may tell them of a
            # change at any time, after the call that started a job too.
            if self._on_update is not None and self.alive:
                self._on_update(str(frame["uri"]))
            return
        if call is None or call.bridge is None:
            return
        bridge = call.bridge
        if op == "progress":
            if not _progress_frame(frame):  # (the plugin API sends none such: a forged frame)
                return
            progress = frame["progress"]
            if call.progressed is not None and progress <= call.progressed:
                return  # MCP: "MUST increase with each notification" (passed on: by review)
            call.progressed = progress
            send: Callable[[], Awaitable[None]] = lambda: bridge.progress(  # noqa: E731
                frame["progress"], frame.get("total"), frame.get("message")
            )
        elif op == "log":
            level, logger = frame.get("level"), frame.get("logger")
            if level not in LOG_LEVELS or not (logger is None or type(logger) is str):
                return
            send = lambda: bridge.log(level, frame.get("data"), logger)  # noqa: E731
        elif op == "resource_updated":
            # One waiting is told once, however often repeated meanwhile: a subscriber that
            # does not read holds up the chain, which must not grow by a task per frame.
            uri = str(frame["uri"])
            if call.updates is None:
                call.updates = set()
            if uri in call.updates:
                return
            call.updates.add(uri)
            send = functools.partial(_tell_updated, bridge, call.updates, uri)
        else:
            send = bridge.close_stream
        assert self._loop is not None
        call.chain = self._loop.create_task(self._relay(call.chain, send))

    def _stray(self, size: int) -> None:
        """A frame of ``size`` bytes for no call in flight, or dropped for its size: one late
        from an abandoned handler is expected; a stream of them (a plugin thread writing to the
        protocol pipe while the worker is idle) would keep the server's loop busy with no call,
        timeout or kill to end it."""
        strays = self._strays
        if self._pipes.dropping:
            return
        now = time.monotonic()
        if now - strays[1] > 1.0:
            strays[:] = [0, now, 0]
        strays[0] += 1
        strays[2] += size
        if strays[0] > _MAX_STRAYS_PER_S or strays[2] > _MAX_STRAY_BYTES_PER_S:
            self._log.error(
                "worker %d sent over %d frames or %d MiB in a second for no call in flight "
                "or over their size",
                self.pid,
                _MAX_STRAYS_PER_S,
                _MAX_STRAY_BYTES_PER_S >> 20,
            )
            self.kill(
                f"it sent over {_MAX_STRAYS_PER_S} frames or {_MAX_STRAY_BYTES_PER_S >> 20} MiB "
                "a second for no call"
            )
            # What else it sends is not handled frame by frame: read at its exit, up to 4 MiB
            # of them held the loop for a second
            self._pipes.dropping = True

    async def _relay(
        self, previous: asyncio.Task[None] | None, send: Callable[[], Awaitable[None]]
    ) -> None:
        if previous is not None:
            await previous
        try:
            # (never waits on a slow client: its progress and log messages are skipped
            # then, rpc/wire.py, so a call's relay holds up neither it nor its slot)
            await send()
        except Exception as exc:  # a lost notification must not fail the call
            self._log.debug("could not relay a notification: %s", exc)

    def _on_request(
        self, call_id: int, head_id: bytes | None, line: bytes, frame: JSON | None = None
    ) -> None:
        """A request of call ``call_id`` to its client (``frame``, if it was parsed already;
        ``head_id`` its own id, as its head gives it): parsed only when the call runs."""
        call = self._calls.get(call_id)
        refusal = "call is over"
        if call is None:
            self._stray(len(line))
        elif _too_many_values(line):
            refusal = (
                f"this request holds over {MAX_FRAME_VALUES:,} values (arrays, objects and "
                "their members), more than one over 1 MiB may hold"
            )
            call = None
        if call is None:
            request_id = frame.get("id") if frame is not None else head_id
            if request_id is not None:  # (none: a frame the worker would not write)
                self._send(
                    {
                        "op": "reply",
                        "id": int(request_id),
                        "error": {"message": refusal, "code": None},
                    }
                )
            return
        if frame is None:
            frame = decode(line)
        request_id = int(frame["id"])
        over = self._over_requests(call)
        if over is not None:
            self._send(
                {
                    "op": "reply",
                    "id": request_id,
                    "error": {"message": over, "code": QuotaExceeded.rpc_code},
                }
            )
            return
        call.asked += 1
        assert self._loop is not None
        task = self._loop.create_task(
            self._relay_request(
                call,
                request_id,
                str(frame["method"]),
                frame.get("params") or {},
                key if isinstance(key := frame.get("key"), str) else None,
                frame.get("thread") is True,
            )
        )
        if call.requests is None:
            call.requests = set()
        call.requests.add(task)
        task.add_done_callback(call.requests.discard)

    def _over_requests(self, call: _Call) -> str | None:
        """Why ``call`` may make no further request of its client now (logged the first time
        for the call), or None."""
        if call.requests is not None and len(call.requests) >= MAX_OPEN_CLIENT_REQUESTS:
            why = (
                f"{call.label} has {MAX_OPEN_CLIENT_REQUESTS} requests to its client open, the "
                "most a call may have at once: await their answers before asking more"
            )
        elif call.asked >= MAX_CLIENT_REQUESTS:
            why = (
                f"{call.label} has made {MAX_CLIENT_REQUESTS} requests of its client, the most "
                "a call may make"
            )
        else:
            return None
        if not call.refused:
            call.refused = True
            self._log.warning(
                "worker %d: %s; its requests past that are refused, not relayed",
                self.pid,
                why,
            )
        return why

    async def _relay_request(
        self,
        call: _Call,
        request_id: int,
        method: str,
        params: JSON,
        key: str | None,
        thread: bool,
    ) -> None:
        REQUEST_HOLDS_THREAD.set(thread)  # (this task's own context)
        try:
            if call.bridge is None:
                raise McpZeroError(f"{method} is not available during this kind of call")
            result = await call.bridge.request(method, params, key)
            reply: JSON = {"op": "reply", "id": request_id, "result": result}
        except McpZeroError as exc:
            reply = {
                "op": "reply",
                "id": request_id,
                "error": {"message": exc.message, "code": exc.rpc_code},
            }
        except Exception as exc:  # the plugin gets the failure, not the kernel
            reply = {
                "op": "reply",
                "id": request_id,
                "error": {"message": f"{type(exc).__name__}: {exc}", "code": None},
            }
        try:
            self._send(reply)
        except TypeError:  # an answer nested too deep for a frame: the plugin hears so
            message = f"the client's answer to {method} nests too deep to be passed on"
            self._send(
                {"op": "reply", "id": request_id, "error": {"message": message, "code": None}}
            )

    def _on_hello(self, op: str, frame: JSON) -> None:
        if self._kill_reason is not None:
            return  # (a ready frame after the kill must not make its start succeed)
        if self._ready is None or self._ready.done():
            raise ValueError(f"unexpected {op} frame")
        if op == "fatal":
            # Before its confined frame: its sandbox could not be set up (its data dir, say),
            # which a later start may overcome; after, the plugin's code failed to load
            failed = PluginLoadFailure if self.sandbox else PluginFailure
            self._ready.set_exception(
                failed(f"plugin '{self.plugin}' failed to load: {frame.get('message')}")
            )
        elif op == "confined" and not self.sandbox:
            # Its first frame, sent before the plugin's code runs: that code could send any
            # later one (found by review: it claimed every measure held in its ready frame)
            held = frame.get("sandbox") or {}
            self.sandbox = {measure: held.get(measure) is True for measure in MEASURES}
        elif op == "ready" and self.sandbox:
            self._ready.set_result(frame)
        else:  # a second confined frame, or a ready one before it
            raise ValueError(f"unexpected {op} frame")

    def on_stderr(self, data: bytes) -> None:
        """Keep the tail of the worker's stderr and pass its lines to logging, within the
        plugin's stderr budget (a plugin writing stderr in a loop must not fill the disk).
        Past a line the budget drops, the rest is counted, not handled line by line, and
        the pipe is left unread for a while: a plugin writing short lines in a loop kept
        the server's loop busy, slowing every plugin's calls 10-20 times (found by review)."""
        data = self._stderr_partial + data
        cut = data.rfind(b"\n") + 1  # the whole lines end there
        if len(data) - cut > _STDERR_LINE_BYTES:  # no newline coming: do not hold it all
            cut = len(data)
        self._stderr_partial = data[cut:]
        start = 0
        while start < cut:
            end = data.find(b"\n", start, cut)
            if end < 0:
                end = cut
            for piece in range(start, max(end, start + 1), _STDERR_LINE_BYTES):
                raw = data[piece : min(piece + _STDERR_LINE_BYTES, end)]
                self._stderr.append(raw)
                if not self._stderr_budget.emit(raw):
                    self._over_budget(data[end + 1 : cut], end - piece - len(raw))
                    return
            start = end + 1

    def _over_budget(self, rest: bytes, rest_of_line: int) -> None:
        """What follows a line the budget dropped: ``rest_of_line`` bytes of it, then the
        lines in ``rest``. They are counted as dropped and the last ones kept in the tail;
        the pipe is read again after a pause (the plugin's writes wait meanwhile)."""
        newlines = rest.count(b"\n")
        unended = bool(rest) and not rest.endswith(b"\n")  # (its last, flushed unended)
        self._stderr_budget.drop(newlines + unended, rest_of_line + len(rest) - newlines)
        tail = rest[:-1] if rest.endswith(b"\n") else rest
        if tail:
            lines = tail.rsplit(b"\n", _STDERR_TAIL_LINES)[-_STDERR_TAIL_LINES:]
            self._stderr.extend(line[-_STDERR_LINE_BYTES:] for line in lines)
        if self._stderr_resume is None and self._stderr_pipe is not None and self._process_running:
            assert self._loop is not None
            self._stderr_paused_once = True
            self._stderr_pipe.pause_reading()
            self._stderr_resume = self._loop.call_later(_STDERR_PAUSE_S, self._resume_stderr)

    def _resume_stderr(self) -> None:
        if self._stderr_resume is not None:
            self._stderr_resume.cancel()
            self._stderr_resume = None
            assert self._stderr_pipe is not None
            self._stderr_pipe.resume_reading()

    # -- death ----------------------------------------------------------------

    def on_stdout_closed(self) -> None:
        self._stdout_open = False
        self._forget_output()
        if self._process_running and self._loop is not None:
            self._loop.call_later(_STDOUT_CLOSED_GRACE_S, self._answers_cut_off)
        self._maybe_gone()

    def _answers_cut_off(self) -> None:
        """A worker that closed its stdout but runs on is dead to the protocol: its calls
        hung until the first one timed out, then failed as if it ignored a cancel (found by
        review). It is ended now, its calls failing with the cause; a new one takes its place."""
        if self._process_running:
            self.kill("it closed its stdout (its answers' pipe) yet kept running")

    def on_stderr_closed(self) -> None:
        self._stderr_open = False
        self._maybe_gone()

    def _last_words_waited(self) -> None:
        self._stderr_open = False  # (a process it left holds stderr: no more waiting)
        self._maybe_gone()

    def on_process_exited(self) -> None:
        self._process_running = False
        if self._transport is None:  # (still spawning: start() tells it, found by review)
            return
        # What it answered comes first, and its end of file. Its own ends of the pipe closed
        # as it exited: unless a process it started holds one, what is left in the pipe (a
        # pipe's worth at most) ends now. Not read without end: such a child may write on
        # (then it is killed, as below). (Its exit could be reported before the pipe's end
        # was read: that was taken for a child holding it, and reported as such.)
        at_end = self._take_in(_TAKE_IN_ALL_BYTES)[1]
        self._forget_output()
        self._resume_stderr()  # its last words
        _LIVE.discard(self.pid)
        record = _record[0]
        if record is not None and _RECORDED.pop(self.pid, None) is not None:
            _rewrite_record(record)
        if _subreaper[0] and self._loop is not None:
            self._loop.call_later(_SWEEP_DELAY_S, _sweep)  # what it left came to us
        if at_end:
            self._stdout_ended()
        elif self._stdout_open:
            # A process the worker started kept its protocol pipe open (it inherited it):
            # the worker is gone all the same, and so must be what it left behind.
            self.kill("it exited, leaving processes that held its pipes")
        self._maybe_gone()

    def _forget_output(self) -> None:
        """Its answers' pipe is no longer held, nor ever again (it exited, or closed it)."""
        if self._outputs is not None:
            self._outputs.discard(self)
            self._outputs = None
        self.release_output(take_in=False)

    def _last_words(self) -> str:
        lines = [raw.decode("utf-8", "replace") for raw in self._stderr if raw.strip()]
        return " | ".join(lines[-3:]) if lines else "(nothing)"

    def _describe_exit(self) -> str:
        code = self.returncode
        if self._kill_reason is not None:
            how = f"was killed because {self._kill_reason}"
        elif code is not None and code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with status {code}"
        return f"plugin '{self.plugin}' worker (pid {self.pid}) {how}"

    def _maybe_gone(self) -> None:
        if self._stdout_open or self._process_running:
            return
        if self._exited is not None and self._exited.done():
            return  # (gone already: its stderr ended after)
        if self._transport is None:
            return  # its start was cancelled as it spawned: asyncio killed and reaped it
        if self._stderr_open and self._stderr_paused_once and self._exited is not None:
            # Read with pauses, its stderr still holds what it wrote last: the crash report
            # quoted lines from before the flood's end (found by review)
            if self._last_words_due is None and self._loop is not None:
                self._last_words_due = self._loop.call_later(_LAST_WORDS_S, self._last_words_waited)
            return
        if self._last_words_due is not None:
            self._last_words_due.cancel()
        assert self._exited is not None
        served, self.alive = self.alive, False
        self.returncode = self._transport.get_returncode()
        if self._stderr_partial:
            self._stderr.append(self._stderr_partial)
            self._stderr_partial = b""
        self._stderr_budget.report()  # what it dropped, before what its death brings
        described = self._describe_exit()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(
                PluginFailure(f"{described} while starting; its stderr: {self._last_words()}")
            )
        calls, self._calls = self._calls, {}
        if calls or (served and not self.retiring and self._kill_reason != _CLOSED):
            # Its stderr goes to the log, not to the callers: agents sharing a worker would
            # read each other's tracebacks in it. (Also with no call in flight: a plugin
            # that dies by itself, in a loop, is seen; and one killed for a handler that
            # ignored its cancel, which was counted but never logged: found by review.)
            self._log.warning("%s; its last stderr: %s", described, self._last_words())
        for call in calls.values():
            for task in call.requests or ():
                task.cancel()
            if not call.future.done():
                call.future.set_exception(
                    PluginCrashed(
                        f"{described} during {call.label}; it is restarted for later calls "
                        "(its stderr is in the server's log)"
                    )
                )
        for zombie in self._zombies.values():
            zombie.kill.cancel()
            zombie.ended()
        self._zombies.clear()
        self._transport.close()
        if not self._exited.done():
            self._exited.set_result(None)
        self._on_exit(self)


# The kill reason of a worker ended because its runtime was closed (not worth a warning).
_CLOSED = "the plugin runtime was closed"


def spawn_failure(exc: OSError) -> str:
    """What stopped a worker's start. uvloop reports some failures as errno -1 ("Unknown
    error -1"): when this process's open files are (nearly) used up, that is the cause."""
    if exc.errno is not None and exc.errno > 0:
        return str(exc)
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        return str(exc)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and used + 8 >= soft:
        return f"too many open files ({used} open, the limit is {soft}: raise 'ulimit -n')"
    return str(exc)


def _too_many_values(line: bytes) -> int:
    """How many values parsing ``line`` would make, if over ``MAX_FRAME_VALUES``; else 0."""
    if len(line) <= _COUNTED_FRAME_BYTES:
        return 0
    values = frame_values(line, MAX_FRAME_VALUES)
    return values if values > MAX_FRAME_VALUES else 0


def _too_deep(line: bytes, frame: JSON) -> bool:
    """Whether ``frame`` (read from ``line``) nests deeper than ``MAX_READ_DEPTH`` levels. Its
    brackets are counted first (in C): only a frame with more of them than that is walked."""
    if line.count(b"[") + line.count(b"{") <= MAX_READ_DEPTH:
        return False
    level: list[Any] = [frame]
    for _ in range(MAX_READ_DEPTH):
        below = []
        for item in level:
            for inner in item.values() if type(item) is dict else item:
                if type(inner) is dict or type(inner) is list:
                    below.append(inner)
        if not below:
            return False
        level = below
    return True


def _number(value: Any) -> bool:
    return (type(value) is int or type(value) is float) and math.isfinite(value)


def _progress_frame(frame: JSON) -> bool:
    """Whether a progress frame is one MCP's notification can carry: a finite number of
    progress, of a finite total if any, with a string message if any. A worker writing
    other values (not through the plugin API) would send clients what breaks their schema."""
    total, message = frame.get("total"), frame.get("message")
    return (
        _number(frame.get("progress"))
        and (total is None or _number(total))
        and (message is None or type(message) is str)
    )


class _Pipes(asyncio.SubprocessProtocol):
    """Feeds the worker's stderr bytes (from its transport) and its stdout frames (from
    what its :class:`WorkerProcess` reads) to that worker."""

    def __init__(self, owner: WorkerProcess) -> None:
        self._owner = owner
        self._lines = LineSplitter(MAX_FRAME_BYTES)
        #: Killed for what it sends (frames for no call): the rest is dropped unread as
        #: frames (read all the same, to its end)
        self.dropping = False

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 2:  # (its stdout is read by its owner: frames)
            self._owner.on_stderr(data)

    def frames(self, data: bytes) -> None:
        """Bytes of its stdout: each whole frame to the worker."""
        lines = self._lines
        if lines.overflowed or self.dropping:
            return  # the worker is being killed; what it still sends is dropped
        for line in lines.feed(data):
            if self.dropping:  # (the rest of a read's worth of them: found by review)
                return
            self._owner.on_line(line)
        while lines.lost:  # frames the server had no memory to assemble
            self._owner.no_room(*lines.lost.pop(0))
        if lines.overflowed:
            self._owner.kill(
                f"it sent a frame over {MAX_FRAME_BYTES >> 20} MiB (a result that large is refused)"
            )

    def partial(self) -> bool:
        """Whether a frame has begun and not ended (a large answer being read)."""
        return self._lines.pending > 0

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 2:  # (its stdout is read by its owner)
            self._owner.on_stderr_closed()

    def process_exited(self) -> None:
        self._owner.on_process_exited()


__all__ = [
    "MAX_CLIENT_REQUESTS",
    "MAX_FRAME_VALUES",
    "MAX_OPEN_CLIENT_REQUESTS",
    "WorkerProcess",
]
