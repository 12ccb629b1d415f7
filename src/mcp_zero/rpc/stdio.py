"""MCP over stdio: newline-delimited JSON-RPC on stdin/stdout, one session, one agent.

The client's first request decides the protocol: ``initialize`` opens a session
(2025-11-25, 2025-06-18); a request carrying the MCP 2026-07-28 envelope in its
``_meta`` makes every request stand alone, as that revision has it.

Clients such as Claude Desktop launch ``mcp0 serve --stdio --agent NAME``.
Requests run concurrently (a slow tool does not block ``ping``); stdout carries
only protocol messages, logs go to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import select
import stat
import sys
from collections.abc import Callable, Coroutine
from typing import Any, BinaryIO, cast

from mcp_zero.errors import UNAUTHORIZED, InvalidRequest, PayloadTooLarge, Unauthorized
from mcp_zero.fdio import write_all
from mcp_zero.kernel.action import Principal
from mcp_zero.rpc import jsonrpc
from mcp_zero.rpc.envelope import has_envelope
from mcp_zero.rpc.list_changes import TERMINATED, ListChanges
from mcp_zero.rpc.server import McpServer
from mcp_zero.rpc.session import JSON, Session
from mcp_zero.runtime import STARTUP_WAIT_S, Runtime
from mcp_zero.sandbox import proctree

MAX_LINE = 16 << 20
# Requests read from a file past the agent's free slots, waiting their turn (reading pauses
# at either bound): the notifications behind them, such as a cancel of a running call, are
# heard meanwhile.
MAX_QUEUED = 1000
MAX_QUEUED_BYTES = 256 << 10
_LAST_WRITE_S = 5.0  # for the client to read the last answers at the end of stdin
_CANCEL_WAIT_S = 5.0  # for cancelled requests to record their end
log = logging.getLogger("mcp_zero.stdio")


class _PipeFlow(asyncio.Protocol):
    """Stdout's pipe transport and its flow control: writable while the client keeps up."""

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self.lost = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()
        self.writable.set()  # a send waiting for the client hears it is gone


class _StdoutChannel:
    """Writes messages to stdout. When the client has closed its end, ``on_gone`` runs once
    (the session ends as at the end of stdin) and later messages are dropped.

    On a pipe (as most MCP clients launch servers) the writes go through the event loop: a
    client slow to read makes the senders wait, not the whole server (its calls go on, their
    audit records are committed, cancellations are heard). Anything else (a socket, a file,
    a terminal, a pipe shared with stderr) is written directly: non-blocking mode would be
    set on what other writers, such as logging on stderr, share."""

    __slots__ = ("_flow", "_gone", "_lock", "_on_gone", "_out")

    def __init__(self, out: BinaryIO, on_gone: Callable[[], None]) -> None:
        self._out = out
        self._lock = asyncio.Lock()
        self._on_gone = on_gone
        self._gone = False
        self._flow: _PipeFlow | None = None  # on a pipe: the transport stdout is written by

    async def open(self) -> None:
        """Write through the event loop if stdout is a pipe of its own."""
        if not _own_pipe(self._out):
            return
        # A duplicate for the transport to close: stdout itself stays open (and blocking
        # again at the end) for whatever writes to it after the session.
        pipe = open(os.dup(self._out.fileno()), "wb", buffering=0)  # noqa: ASYNC230, SIM115 (an fd)
        loop = asyncio.get_running_loop()
        try:
            _, self._flow = await loop.connect_write_pipe(_PipeFlow, pipe)
        except BaseException:
            pipe.close()
            raise

    async def send(self, message: JSON) -> None:
        data = jsonrpc.encode(message) + b"\n"
        async with self._lock:
            if self._gone:
                return
            flow = self._flow
            try:
                if flow is None:
                    _write_blocking(self._out, data)
                    return
                transport = flow.transport
                assert transport is not None
                if flow.lost.is_set() or transport.is_closing():
                    raise BrokenPipeError
                transport.write(data)
                await flow.writable.wait()
                if flow.lost.is_set():
                    raise BrokenPipeError
            except (BrokenPipeError, ConnectionResetError):
                self._gone = True
                log.info("the client closed stdout: ending the session")
                self._on_gone()

    async def close_stream(self) -> None:
        return None  # stdio has no stream to close and resume

    async def aclose(self, timeout: float) -> None:
        """Write out what is buffered (for at most ``timeout`` seconds), then close."""
        flow = self._flow
        if flow is None or flow.transport is None:
            return
        flow.transport.close()  # (after its buffer is written)
        try:
            async with asyncio.timeout(timeout):
                await flow.lost.wait()
        except TimeoutError:
            log.warning("the client did not read its last answers in %g s", timeout)
            flow.transport.abort()
        with contextlib.suppress(OSError, ValueError):
            os.set_blocking(self._out.fileno(), True)


def _write_blocking(out: BinaryIO, data: bytes) -> None:
    """Write all of ``data`` to ``out``, waiting for it if it is non-blocking: stdin's
    transport makes a socket that is stdin and stdout both (inetd, socat) non-blocking, and
    a write then takes only what the socket has room for (a 300 KB answer was cut short)."""
    try:
        fd = out.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):
        out.write(data)  # (a test's buffer)
        out.flush()
        return
    out.flush()  # what the stream holds goes first
    write_all(fd, data)


def _own_pipe(out: BinaryIO) -> bool:
    """Whether ``out`` is a pipe that stderr does not share. (Not a socket: the transport
    would read it too, taking a client's half-close, or stdin on the same socket as inetd
    and socat give, for the client gone.)"""
    try:
        fd = out.fileno()
        mine = os.fstat(fd)
    except (OSError, ValueError, io.UnsupportedOperation):
        return False  # no file descriptor (a test's buffer): written directly
    if not stat.S_ISFIFO(mine.st_mode):
        return False
    try:
        err = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return True
    return (err.st_dev, err.st_ino) != (mine.st_dev, mine.st_ino)


def _unpollable(source: BinaryIO) -> bool:
    """Whether stdin is nothing a loop can wait on: a regular file (``< requests.jsonl``), or
    a device that epoll refuses, such as ``/dev/null`` (``docker run`` without ``-i``,
    systemd's ``StandardInput=null``): libuv aborted the process on one, and asyncio's loop
    hung (found by review). A thread reads those."""
    try:
        fd = source.fileno()
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return True
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    if not hasattr(select, "epoll"):
        return False
    try:
        with select.epoll() as probe:
            probe.register(fd, select.EPOLLIN)
    except PermissionError:  # (EPERM: a file or device that cannot be polled)
        return True
    except OSError:
        return False
    return False


def _blocking_fd(source: BinaryIO) -> int | None:
    """stdin's descriptor, if it is blocking now. Its transport makes it non-blocking, and a
    terminal shares that with the shell, which read EAGAIN after the session (found by
    review): it is made blocking again at the end, by its number (asyncio's transport closes
    the file object, not the descriptor)."""
    try:
        fd = source.fileno()
        return fd if os.get_blocking(fd) else None
    except (OSError, ValueError, io.UnsupportedOperation):
        return None


async def _feed_from_file(
    source: BinaryIO, reader: asyncio.StreamReader, wanted: asyncio.Event
) -> None:
    """Read stdin that is a regular file into ``reader`` (reads from a file do not wait
    on anyone, so a thread reads it a chunk at a time), only while the line loop waits on
    ``reader`` for more (``wanted``): a file is read no further ahead than a chunk or two
    past the line the loop reads, as a pipe would be. Its end, or a stop, ends it."""
    try:
        while True:
            while not wanted.is_set():  # (a wake-up the loop took back: it has lines)
                await wanted.wait()
            chunk = await asyncio.to_thread(source.read, 1 << 16)
            if not chunk:
                return
            reader.feed_data(chunk)
    finally:
        reader.feed_eof()


async def _turn_came(
    turn: asyncio.Future[bool], request: jsonrpc.Request, session: Session
) -> bool:
    """Wait for the turn of a request read from a file: True when it may start, False when
    the session ended first (its closing cancels the wait). A client's cancel ends it."""
    try:
        return await turn
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not session.closed or request.id in session.cancelled or task is None:
            raise
        task.uncancel()
        return False


async def _wait_all(tasks: set[asyncio.Task[Any]], seconds: float) -> None:
    """Wait up to ``seconds`` for ``tasks`` to end, and for those their ends start (a
    cancelled request's record) to end too."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while tasks and loop.time() < deadline:
        await asyncio.wait(set(tasks), timeout=deadline - loop.time())


async def _skip_line(reader: asyncio.StreamReader, consumed: int) -> None:
    """Read and drop the rest of a line over MAX_LINE, through its newline (or the end of
    stdin): ``consumed`` bytes of it are buffered, without the newline."""
    while True:
        await reader.readexactly(consumed)
        try:
            await reader.readuntil(b"\n")
            return
        except asyncio.IncompleteReadError:
            return
        except asyncio.LimitOverrunError as exc:
            consumed = exc.consumed


async def serve_stdio(
    runtime: Runtime,
    principal: Principal,
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
    *,
    handle_signals: bool = False,
    credential: str | None = None,
) -> None:
    """Serve one MCP session on stdin/stdout until stdin closes (or, ``handle_signals``,
    SIGTERM or SIGINT: the requests still running, and the calls waiting for a 2026-07-28
    retry, are cancelled and audited, the runtime closed, as at the end of stdin but without
    waiting for them). ``credential``: the hash of the token it was opened with, if any; the
    session ends when that token is rotated."""
    main = asyncio.current_task()
    signalled: list[int] = []
    if handle_signals and main is not None:

        def stop(number: int) -> None:
            if not signalled:
                signalled.append(number)
                main.cancel()

        for number in proctree.STOP_SIGNALS:
            asyncio.get_running_loop().add_signal_handler(number, stop, number)
    source = stdin or sys.stdin.buffer
    blocking_fd = _blocking_fd(source)
    try:
        await _serve_stdio(runtime, principal, source, stdout, credential)
    except asyncio.CancelledError:
        if not signalled:
            raise
        log.info("stopped by signal %d; the requests still running were cancelled", signalled[0])
    finally:  # (also after a stop or a failure as it starts)
        if blocking_fd is not None:
            with contextlib.suppress(OSError):
                os.set_blocking(blocking_fd, True)


async def _serve_stdio(
    runtime: Runtime,
    principal: Principal,
    source: BinaryIO,
    stdout: BinaryIO | None,
    credential: str | None,
) -> None:
    server = McpServer(runtime.kernel, page_size=runtime.settings.page_size, transport="stdio")
    session = Session(principal, credential=credential)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    stopped = [False]  # the session ended before stdin did (a file's lines start no more)
    stop_reading: Callable[[], None]
    wanted = asyncio.Event()  # the line loop waits on the reader (a file is read only then)
    from_file = _unpollable(source)
    if from_file:  # (`< requests.jsonl`: no pipe transport takes a file)
        feeding = asyncio.create_task(_feed_from_file(source, reader, wanted))

        def stop_reading() -> None:
            stopped[0] = True  # (lines read into the buffer before are not started either)
            feeding.cancel()
            # What waits its turn does not start: each is answered (if stdout is still
            # read) and recorded as cancelled before it started (`run`). Dropped, they had
            # no answer and no record of what was asked (found by review).
            for turn, (size, _, _) in list(queued.items()):
                unqueue(turn, size)
                if not turn.done():
                    turn.set_result(False)
    else:
        stdin_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), source
        )
        stop_reading = stdin_transport.close
    # Closing stdin's transport ends the reader as the end of stdin would.
    channel = _StdoutChannel(stdout or sys.stdout.buffer, stop_reading)
    await channel.open()
    # Server-initiated messages go to a session; 2026-07-28 has none (listen streams instead).
    # (nor before the first request says which it is)
    server.sessions = lambda: [(session, channel)] if stateless is False else []
    tasks: set[asyncio.Task[Any]] = set()

    stateless: bool | None = None  # the first request decides: MCP 2026-07-28 or a session
    # From a file, requests start only as fast as they are answered: at most the agent's
    # max_concurrency wait for their answers (more would be refused), and MAX_LINE of their
    # lines (not listen streams: they stay open until the end of stdin). Those read past
    # that wait in order, MAX_QUEUED or MAX_QUEUED_BYTES of them; the file is read no further.
    ahead = [0, 0]  # requests started and not yet answered, and their bytes
    max_ahead = runtime.settings.max_concurrency
    # waiting to start, in file order: their line's size, whether they take a slot, task;
    # each turn is set True when it starts, False when the session ends first
    queued: dict[asyncio.Future[bool], tuple[int, bool, asyncio.Task[None]]] = {}
    queued_bytes = [0]
    moved = asyncio.Event()  # a request left the queue

    async def unstarted(request: jsonrpc.Request) -> None:
        """Answer a request the session ended before it started (if stdout is still read),
        and record it as cancelled, as a client's cancel of it would be."""
        await channel.send(
            jsonrpc.error_message(
                request.id,
                UNAUTHORIZED,
                "session_ended",
                "the session ended (or its agent was terminated) before this request started",
            )
        )
        await server.audit_unstarted(session, request)

    async def run(request: jsonrpc.Request, turn: asyncio.Future[bool] | None) -> None:
        if turn is not None and not await _turn_came(turn, request, session):
            await unstarted(request)
            return
        try:  # as HTTP authenticates each request: the agent's plugins may have changed
            admitted = runtime.agents.admission(principal.agent, anonymous=principal.anonymous)
            if credential is not None and credential != admitted.token_hash:
                raise Unauthorized(
                    f"agent {principal.agent!r} has a new token: the one in MCP0_TOKEN, which "
                    "opened this session, was rotated (start the session again with the new one)"
                )
            session.principal = admitted.principal
            runtime.plugins.take_up(admitted.principal.plugins)  # (attached since: started)
        except Unauthorized as exc:  # terminated, or its token rotated
            await channel.send(jsonrpc.error_from_exception(request.id, exc))
            return
        if stateless:
            response = await server.handle_stateless_request(session, request, channel)
        else:
            response = await server.handle_request(session, request, channel)
        if response is not None:
            await channel.send(response)

    def spawn(work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        awaited(task)
        return task

    def awaited(task: asyncio.Task[Any]) -> None:
        """Count ``task`` among those the session waits for as it ends."""
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def start(request: jsonrpc.Request, size: int) -> None:
        turn = loop.create_future() if from_file else None
        task = spawn(run(request, turn))
        # Admitted now, not when the task first runs: a notifications/cancelled read in the
        # same chunk of stdin (or while it waits its turn) must find it (a refused id is
        # answered when the task runs).
        server.admit(session, request, task)
        task.add_done_callback(lambda done: ended(request, done))
        if turn is not None and stopped[0]:
            turn.set_result(False)  # read before the session ended: it does not start
        elif turn is not None:
            slot = request.method != "subscriptions/listen"
            queued[turn] = (size, slot, task)
            queued_bytes[0] += size
            task.add_done_callback(lambda _: answer_came(turn, size, slot))
            start_queued()

    def unqueue(turn: asyncio.Future[bool], size: int) -> None:
        del queued[turn]
        queued_bytes[0] -= size
        moved.set()

    def start_queued() -> None:
        """Start the queued requests, in order, while the agent has slots free."""
        while queued:
            turn = next(iter(queued))
            size, slot, _ = queued[turn]
            if turn.cancelled():  # (its task's end unqueues it too)
                unqueue(turn, size)
                continue
            if slot and (ahead[0] >= max_ahead or ahead[1] >= MAX_LINE):
                return
            unqueue(turn, size)
            if slot:
                ahead[0] += 1
                ahead[1] += size
            turn.set_result(True)

    def answer_came(turn: asyncio.Future[bool], size: int, slot: bool) -> None:
        if turn in queued:  # cancelled while it waited
            unqueue(turn, size)
        elif slot and turn.done() and not turn.cancelled() and turn.result():  # it started
            ahead[0] -= 1
            ahead[1] -= size
        start_queued()

    def ended(request: jsonrpc.Request, task: asyncio.Task[None]) -> None:
        if session.inflight.get(request.id) is not task:
            return  # it ran: handle_request unregistered it
        # Cancelled before it started: by the client (audited, as a call cut off while it
        # ran would be), or by the end of the session.
        del session.inflight[request.id]
        if request.id in session.cancelled:
            session.cancelled.discard(request.id)
            spawn(server.audit_unstarted(session, request))
        elif session.closed and task.cancelled():
            # The session's close cancelled it before its first step: run() never ran
            spawn(unstarted(request))

    # Only its agent's plugins start (its calls are the only ones made here: the others'
    # workers cost a start, and memory, for nothing), waited for at most STARTUP_WAIT_S (a
    # slow one, which may hang as it loads, holds up no client's launch); those attached
    # later start as the session sees them (run), and those installed later if attached.
    runtime.plugins.starts_only = set(principal.plugins)
    await runtime.start(wait=STARTUP_WAIT_S)

    async def end_revoked(ended: Session, why: str) -> None:
        """The session's agent was terminated, or the token it was opened with rotated
        (``why``): its calls running now stop, answered -32001. A rotated token's session
        refuses each later request. A terminated agent's ends, and the process with it, as
        at the end of stdin: the client starts it again once the agent is recovered (over
        HTTP it initializes again). Kept open, it served a recovered agent with no
        subscriptions, notices or questions to the client (found by review)."""
        log.info("agent %r %s: ending this session", ended.principal.agent, why)
        ended.close()
        if why == TERMINATED:
            stop_reading()

    list_changes = ListChanges(
        runtime.kernel,
        runtime.agents,
        server.sessions,
        lambda: server.listeners.values(),
        end_revoked,
        at_work=server.principals_at_work,
        end_agent=server.end_agent,
        transport=server.transport,
    )
    list_changes.seen(session)
    runtime.plugins.on_change = list_changes.poke
    runtime.plugins.on_resource_updated = server.announce_resource_updated
    runtime.agents.on_change = list_changes.poke
    watch = asyncio.create_task(list_changes.run())
    try:
        while True:
            while len(queued) >= MAX_QUEUED or queued_bytes[0] >= MAX_QUEUED_BYTES:
                moved.clear()
                await moved.wait()
            wanted.set()
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:  # the end of stdin
                line = exc.partial
            except asyncio.LimitOverrunError as exc:  # a line over MAX_LINE: dropped whole
                await _skip_line(reader, exc.consumed)
                wanted.clear()
                too_large = PayloadTooLarge(f"message over {MAX_LINE} bytes")
                await channel.send(jsonrpc.error_from_exception(None, too_large))
                continue
            wanted.clear()
            if not line:
                break
            if not line.strip():
                continue
            try:
                message = jsonrpc.decode(line)
            except InvalidRequest as exc:
                await channel.send(jsonrpc.error_from_exception(jsonrpc.error_id(exc), exc))
                continue
            if isinstance(message, jsonrpc.Request):
                if stateless is None:
                    stateless = message.method != "initialize" and has_envelope(message.params)
                start(message, len(line))
            elif isinstance(message, jsonrpc.Notification):
                server.handle_notification(session, message)
            else:
                if message.problem is not None:
                    # Said here only: JSON-RPC answers no answer, and an error under its id
                    # would pass for the answer to the client's own request of that id.
                    log.warning(
                        "the client's answer to request %r is malformed: %s",
                        message.id,
                        message.problem,
                    )
                server.handle_response(session, message)  # (a malformed one fails its question)
        # Answers come on stdin: the client's questions fail now, not at the wait below.
        session.end_answers("stdin ended: the client can answer no more")
        while queued:  # (the end of a file: what it asked for is yet to start)
            moved.clear()
            await moved.wait()
        # stdin closed: subscriptions/listen streams end, and the calls parked on a 2026-07-28
        # client's retry are cancelled (waited for with the requests: their records)
        for parked in server.end_listeners():
            awaited(parked)
        await _wait_all(tasks, 30)
        if left := sum(not task.done() for task in tasks):  # (cancelled below)
            log.warning(
                "%d request(s) still running, or their answers unread, 30 s after the end "
                "of stdin: cancelled (a running one audited as such, and answered -32001 "
                "if the client still reads)",
                left,
            )
    finally:
        watch.cancel()
        runtime.plugins.on_change = None
        runtime.plugins.on_resource_updated = None
        runtime.agents.on_change = None
        # (after a signal, not done above) Parked calls run in no request: left to the end of
        # their workers, they were recorded as plugin failures and their questions' records
        # lost, the audit log closed by then (found by a bug hunt).
        for parked in server.end_listeners():
            awaited(parked)
        session.close()
        for task in tasks:
            task.cancel()
        await _wait_all(tasks, _CANCEL_WAIT_S)  # their records go in before the log closes
        with contextlib.suppress(Exception):
            await runtime.aclose()
        await channel.aclose(_LAST_WRITE_S)
