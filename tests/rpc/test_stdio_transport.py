"""MCP over stdio: newline-delimited JSON-RPC, in process (``serve_stdio`` on OS pipes) and as
``mcp0 serve --stdio`` speaking raw JSON lines."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import itertools
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from rpc_live import CHATTY_DIR, FAULTY_DIR, NOTES_DIR, make_runtime

from mcp_zero.rpc.stdio import MAX_LINE, serve_stdio
from mcp_zero.runtime import Runtime
from mcp_zero.storage.sqlite import SqliteStore

pytestmark = pytest.mark.anyio
JSON = dict[str, Any]
TIMEOUT_S = 20.0
MCP0 = str(Path(sys.executable).parent / "mcp0")


class StdioPeer:
    """The client end of the pipes: write lines to the server's stdin, read its stdout."""

    def __init__(self, write_fd: int, reader: asyncio.StreamReader, runtime: Runtime) -> None:
        self.write_fd = write_fd
        self.reader = reader
        self.runtime = runtime

    def audited(self, request_id: str) -> list[JSON]:
        """The audit records of ``request_id``, as committed so far."""
        records = (orjson.loads(e.body) for e in self.runtime.store.read_audit(0, 100_000))
        return [r for r in records if r.get("request_id") == request_id]

    def end_stdin(self) -> None:
        """Close the server's stdin; a stand-in takes its descriptor, for the fixture's close."""
        os.close(self.write_fd)
        self.write_fd = os.open(os.devnull, os.O_WRONLY)

    def send_line(self, line: bytes) -> None:
        os.write(self.write_fd, line + b"\n")

    def send(self, message: JSON) -> None:
        self.send_line(orjson.dumps(message))

    async def receive(self) -> JSON:
        with anyio.fail_after(TIMEOUT_S):
            line = await self.reader.readline()
        assert line, "the server closed stdout"
        message: JSON = orjson.loads(line)
        return message

    async def until_id(self, rid: Any) -> list[JSON]:
        """Messages up to and including the response with id ``rid``."""
        out = []
        while True:
            message = await self.receive()
            out.append(message)
            if message.get("id") == rid and "method" not in message:
                return out


@contextlib.asynccontextmanager
async def stdio_server(
    tmp_path: Path, plugins: tuple[str, ...] = ("notes", "faulty")
) -> AsyncIterator[StdioPeer]:
    runtime = make_runtime(tmp_path / "data")
    runtime.plugins.install(NOTES_DIR)
    runtime.plugins.install(FAULTY_DIR)
    await runtime.agents.spawn("piper", list(plugins))
    principal = runtime.agents.principal("piper")
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    stdin = open(in_r, "rb", buffering=0)  # noqa: SIM115 - closed below
    stdout = open(out_w, "wb", buffering=0)  # noqa: SIM115
    stdout_reader_file = open(out_r, "rb", buffering=0)  # noqa: SIM115
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), stdout_reader_file
    )
    task = asyncio.create_task(serve_stdio(runtime, principal, stdin, stdout))
    try:
        yield StdioPeer(in_w, reader, runtime)
    finally:
        os.close(in_w)  # end of stdin: the server finishes and closes the runtime
        with anyio.fail_after(TIMEOUT_S):
            await task
        transport.close()
        stdin.close()
        stdout.close()


def initialize_message(rid: int = 1, version: str = "2025-06-18") -> JSON:
    return {
        "jsonrpc": "2.0",
        "id": rid,
        "method": "initialize",
        "params": {
            "protocolVersion": version,
            "capabilities": {},
            "clientInfo": {"name": "pipes", "version": "0"},
        },
    }


async def test_initialize_call_and_a_malformed_line_over_pipes(tmp_path: Path) -> None:
    async with stdio_server(tmp_path) as peer:
        peer.send(initialize_message())
        reply = await peer.receive()
        assert reply["id"] == 1
        assert reply["result"]["protocolVersion"] == "2025-06-18"
        peer.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        peer.send(
            {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {"name": "notes_add", "arguments": {"text": "over a pipe"}},
            }
        )
        added = await peer.receive()
        assert added["id"] == 2
        assert added["result"]["structuredContent"]["note"]["text"] == "over a pipe"
        peer.send_line(b'{"jsonrpc": "2.0", "id": 3, "method": ')
        broken = await peer.receive()
        assert broken["error"]["code"] == -32700
        assert broken["id"] is None
        peer.send_line(b"")  # blank lines are ignored
        peer.send_line(b'[{"jsonrpc": "2.0", "id": 4, "method": "ping"}]')
        assert (await peer.receive())["error"]["code"] == -32600
        peer.send({"jsonrpc": "2.0", "id": 5, "method": "ping"})
        assert await peer.receive() == {"jsonrpc": "2.0", "id": 5, "result": {}}


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def test_a_line_over_the_limit_is_dropped_whole_with_one_error(tmp_path: Path) -> None:
    async with stdio_server(tmp_path) as peer:
        peer.send(initialize_message())
        await peer.receive()
        # a ping hidden at the end of an oversized line, and a request 2.5 times the limit
        hidden = (
            b" " * (MAX_LINE + (1 << 20)) + b'{"jsonrpc": "2.0", "id": "hidden", "method": "ping"}'
        )
        huge = b'{"jsonrpc": "2.0", "id": 7, "method": "ping", "params": {"x": "%s"}}' % (
            b"a" * (MAX_LINE * 5 // 2)
        )
        # from a thread: the pipe fills while the server, on this loop, reads it
        await asyncio.to_thread(write_all, peer.write_fd, hidden + b"\n" + huge + b"\n")
        peer.send({"jsonrpc": "2.0", "id": 8, "method": "ping"})
        answers = await peer.until_id(8)
        over = {
            "code": -32600,
            "message": f"message over {MAX_LINE} bytes",
            "data": {"code": "payload_too_large"},  # (it had none: found by review)
        }
        assert [(a["id"], a.get("error")) for a in answers] == [
            (None, over),
            (None, over),
            (8, None),
        ]


async def test_a_slow_call_does_not_block_ping(tmp_path: Path) -> None:
    async with stdio_server(tmp_path) as peer:
        peer.send(initialize_message())
        await peer.receive()
        peer.send(
            {
                "jsonrpc": "2.0",
                "id": "slow",
                "method": "tools/call",
                "params": {"name": "faulty_nap", "arguments": {"seconds": 0.8}},
            }
        )
        peer.send({"jsonrpc": "2.0", "id": "quick", "method": "ping"})
        first = await peer.receive()
        assert first["id"] == "quick"
        second = await peer.receive()
        assert second["id"] == "slow"
        assert second["result"]["content"][0]["text"] == "napped 0.8"


async def test_progress_and_errors_over_stdio(tmp_path: Path) -> None:
    async with stdio_server(tmp_path) as peer:
        peer.send(initialize_message())
        await peer.receive()
        peer.send(
            {
                "jsonrpc": "2.0",
                "id": 10,
                "method": "tools/call",
                "params": {
                    "name": "faulty_progress",
                    "arguments": {"steps": 2},
                    "_meta": {"progressToken": 99},
                },
            }
        )
        messages = await peer.until_id(10)
        progress = [m["params"]["progress"] for m in messages[:-1]]
        assert progress == [1, 2]
        assert all(m["params"]["progressToken"] == 99 for m in messages[:-1])
        peer.send(
            {
                "jsonrpc": "2.0",
                "id": 11,
                "method": "tools/call",
                "params": {"name": "notes_add", "arguments": {"text": 1}},
            }
        )
        error = (await peer.receive())["error"]
        assert error["code"] == -32602
        assert error["data"]["path"] == "/text"


async def data_dir_with_agent(tmp_path: Path, agent: str) -> Path:
    """A data dir with the faulty plugin and ``agent`` attached to it, for `mcp0 serve`."""
    data_dir = tmp_path / "data"
    runtime = make_runtime(data_dir)
    runtime.plugins.install(FAULTY_DIR)
    await runtime.agents.spawn(agent, ["faulty"])
    runtime.close()
    return data_dir


async def test_mcp0_serve_stdio_speaks_json_lines(tmp_path: Path) -> None:
    data_dir = await data_dir_with_agent(tmp_path, "cli-piper")
    lines = [
        orjson.dumps(initialize_message(version="2025-11-25")),
        b'{"jsonrpc": "2.0", "method": "notifications/initialized"}',
        b"this is not json",
        orjson.dumps(
            {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {"name": "faulty_echo", "arguments": {"text": "from cli"}},
            }
        ),
    ]
    done = await anyio.run_process(
        [MCP0, "serve", "--stdio", "--agent", "cli-piper", "--data-dir", str(data_dir)],
        input=b"\n".join(lines) + b"\n",
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    # requests run concurrently, so answers may come in any order
    replies = {r.get("id"): r for r in map(orjson.loads, done.stdout.splitlines())}
    assert sorted(replies, key=str) == [1, 2, None]
    assert replies[1]["result"]["protocolVersion"] == "2025-11-25"
    assert replies[None]["error"]["code"] == -32700
    assert replies[2]["result"]["content"][0]["text"] == "from cli"


@contextlib.asynccontextmanager
async def piped_stdio_server(
    data_dir: Path, agent: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`mcp0 serve --stdio` as ``agent`` on ``data_dir``, its stdin and stdout piped to the
    test (stderr discarded); killed at the end of the block if still running."""
    server = await asyncio.create_subprocess_exec(
        *(MCP0, "serve", "--stdio", "--agent", agent, "--data-dir", str(data_dir)),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert server.stdin is not None
    assert server.stdout is not None
    try:
        yield server
    finally:
        if server.returncode is None:
            server.kill()
            with anyio.fail_after(TIMEOUT_S):
                await server.communicate()  # (reads stdout to its end: wait() needs that)


async def test_a_client_slow_to_read_stdout_holds_up_its_answers_not_the_server(
    tmp_path: Path,
) -> None:
    """While a 4 MiB answer waits for the client to read it, the server goes on: the next
    call runs and its audit record is committed (writing stdout directly would block the
    whole server in that write). Then both answers arrive, whole, in the order sent."""
    data_dir = tmp_path / "data"
    runtime = make_runtime(data_dir)
    runtime.plugins.install(FAULTY_DIR)
    await runtime.agents.spawn("slow-reader", ["faulty"])
    big = "x" * (4 << 20)
    # The client reads nothing while it sends: its end of stdout holds at most the pipe's
    # buffer and its reader's (128 KiB, asyncio's default), the answer stays mostly unsent.
    try:
        async with piped_stdio_server(data_dir, "slow-reader") as server:
            assert server.stdin is not None
            assert server.stdout is not None
            call = {"jsonrpc": "2.0", "method": "tools/call"}
            server.stdin.write(orjson.dumps(initialize_message()) + b"\n")
            for rid, text in (("big", big), ("after", "small")):
                params = {"name": "faulty_echo", "arguments": {"text": text}}
                server.stdin.write(orjson.dumps({**call, "id": rid, "params": params}) + b"\n")
                await server.stdin.drain()
                with anyio.fail_after(TIMEOUT_S):  # (an answer is sent once its record is)
                    while not any(r.get("request_id") == rid for r in audited(runtime)):
                        await asyncio.sleep(0.05)
            out = b""
            with anyio.fail_after(TIMEOUT_S):
                while out.count(b"\n") < 3:
                    chunk = await server.stdout.read(1 << 20)
                    assert chunk, "the server closed stdout"
                    out += chunk
            answers = [orjson.loads(line) for line in out.splitlines()]
            assert [a["id"] for a in answers] == [1, "big", "after"]
            assert answers[1]["result"]["content"][0]["text"] == big
            server.stdin.close()
            with anyio.fail_after(TIMEOUT_S):
                assert await server.wait() == 0
    finally:
        runtime.close()


@pytest.mark.parametrize("stdout", ["file", "pipe shared with stderr"])
async def test_mcp0_serve_stdio_writes_to_a_file_or_a_pipe_shared_with_stderr(
    tmp_path: Path, stdout: str
) -> None:
    """Written directly there: non-blocking mode on a pipe stderr shares would make its log
    lines fail when the pipe is full."""
    data_dir = await data_dir_with_agent(tmp_path, "filer")
    lines = [
        orjson.dumps(initialize_message()),
        orjson.dumps(
            {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {"name": "faulty_echo", "arguments": {"text": "to a file"}},
            }
        ),
    ]
    command = [MCP0, "serve", "--stdio", "--agent", "filer", "--data-dir", str(data_dir)]
    stdin = b"\n".join(lines) + b"\n"
    if stdout == "file":
        with (tmp_path / "out").open("wb") as out:
            done = await anyio.run_process(command, input=stdin, stdout=out, check=False)
        written = (tmp_path / "out").read_bytes()
    else:
        done = await anyio.run_process(command, input=stdin, stderr=subprocess.STDOUT, check=False)
        written = done.stdout
    assert done.returncode == 0, written
    replies = {r.get("id"): r for r in map(orjson.loads, written.splitlines())}
    assert replies[2]["result"]["content"][0]["text"] == "to a file"


async def test_mcp0_serve_stdio_on_one_socket_for_stdin_and_stdout(tmp_path: Path) -> None:
    """As inetd, systemd's socket activation and socat give it: the client writes its
    requests, half-closes, and reads every answer (writing through the event loop took the
    requests, then the half-close, on the socket for the client gone)."""
    data_dir = await data_dir_with_agent(tmp_path, "socketed")
    ours, theirs = socket.socketpair()
    command = [MCP0, "serve", "--stdio", "--agent", "socketed", "--data-dir", str(data_dir)]
    with ours, theirs:
        server = subprocess.Popen(command, stdin=theirs, stdout=theirs, stderr=subprocess.DEVNULL)
        theirs.close()
        try:
            ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
            ours.sendall(orjson.dumps(initialize_message()) + b"\n" + orjson.dumps(ping) + b"\n")
            for rid in range(3, 8):  # answers larger than the socket's buffer (were cut short)
                ours.sendall(orjson.dumps(echo_call(rid, str(rid) * 300_000)) + b"\n")
            ours.shutdown(socket.SHUT_WR)
            ours.settimeout(TIMEOUT_S)
            out = b""
            while chunk := await asyncio.to_thread(ours.recv, 65536):
                out += chunk
            assert await asyncio.to_thread(server.wait, TIMEOUT_S) == 0
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    answers = {message["id"]: message for message in map(orjson.loads, out.splitlines())}
    assert sorted(answers) == [1, 2, 3, 4, 5, 6, 7]
    for rid in range(3, 8):
        assert answers[rid]["result"]["content"][0]["text"] == str(rid) * 300_000


def echo_call(rid: int, text: str) -> JSON:
    params = {"name": "faulty_echo", "arguments": {"text": text}}
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params}


async def test_mcp0_serve_stdio_reads_requests_from_a_file(tmp_path: Path) -> None:
    # (`< requests.jsonl` aborted the process: the event loop's pipe transport takes no file)
    data_dir = await data_dir_with_agent(tmp_path, "scripted")
    requests = tmp_path / "requests.jsonl"
    ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
    requests.write_bytes(orjson.dumps(initialize_message()) + b"\n" + orjson.dumps(ping) + b"\n")
    command = [MCP0, "serve", "--stdio", "--agent", "scripted", "--data-dir", str(data_dir)]
    with requests.open("rb") as stdin:
        done = await anyio.run_process(command, stdin=stdin, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert sorted(orjson.loads(line)["id"] for line in done.stdout.splitlines()) == [1, 2]


async def test_requests_from_a_file_are_read_no_further_ahead_than_they_are_answered(
    tmp_path: Path,
) -> None:
    """`< requests.jsonl` was read whole at once and every request started: 100 MB of
    requests held 285 MB while the client read no answers, and all but 64 of 3,000 calls
    were refused for the agent's concurrency. Now the file is read as its requests are
    answered: while the client reads nothing, the reader stays near the start."""
    runtime = make_runtime(tmp_path / "data", rate_limit=0)
    runtime.plugins.install(FAULTY_DIR)
    await runtime.agents.spawn("scripted", ["faulty"])
    principal = runtime.agents.principal("scripted")
    count = 3000
    lines = [orjson.dumps(initialize_message())]
    lines += [orjson.dumps(echo_call(rid, "x" * 900)) for rid in range(2, count + 2)]
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    ends = list(itertools.accumulate(len(line) + 1 for line in lines))  # where each ends
    out_r, out_w = os.pipe()
    fcntl.fcntl(out_w, fcntl.F_SETPIPE_SZ, 4096)  # (the smallest: little is answered unread)
    stdout = open(out_w, "wb", buffering=0)  # noqa: SIM115 - closed below
    with path.open("rb", buffering=0) as stdin, stdout, open(out_r, "rb", buffering=0) as out:
        task = asyncio.create_task(serve_stdio(runtime, principal, stdin, stdout))
        try:
            # The client reads no answer: 64 calls (max_concurrency) wait for it to, besides
            # those answered into the pipe and the transport's buffer (64 KiB, ~70 answers),
            # ~270 wait their turn (MAX_QUEUED_BYTES), and the reader is a chunk or two
            # (64 KiB, ~65 lines each) past the loop: ~550 lines in at most. (It was at the end.)
            with anyio.fail_after(TIMEOUT_S):
                while sum(r.get("verb") == "call_tool" for r in audited(runtime)) < 64:
                    await asyncio.sleep(0.05)
            read = stdin.tell()
            assert read <= ends[800], f"{read} of {ends[-1]} bytes read, {count} requests"
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader()
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), out
            )
            try:
                with anyio.fail_after(TIMEOUT_S * 3):
                    answers = [orjson.loads(await reader.readline()) for _ in lines]
                    await task  # (the end of the file: the session ends)
            finally:
                transport.close()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert sorted(answer["id"] for answer in answers) == list(range(1, count + 2))
    # none refused for the agent's concurrency (they were: all read and started at once)
    assert all("result" in answer for answer in answers), [
        answer["error"] for answer in answers if "error" in answer
    ][:3]


async def test_a_cancel_in_a_file_is_heard_while_the_agents_calls_are_all_running(
    tmp_path: Path,
) -> None:
    """With max_concurrency=1 the file was read no further while one call ran, so the cancel
    of that call, next in the file, was read only when it answered: a call that waits until
    cancelled ran on (a 4 s call cancelled at 0.4 s ran its 4 s, audited allowed). Requests
    read past the free slots now wait their turn, and cancels are heard as read."""
    runtime = make_runtime(tmp_path / "data", rate_limit=0, max_concurrency=1)
    runtime.plugins.install(FAULTY_DIR)
    await runtime.agents.spawn("scripted", ["faulty"])
    principal = runtime.agents.principal("scripted")
    lines = [initialize_message(), {"jsonrpc": "2.0", "method": "notifications/initialized"}]
    lines += [call("c1", "faulty_started_then_wait", {}), call("c2", "faulty_echo", {"text": "x"})]
    lines += [echo_call(3, "after"), cancelled("c2"), cancelled("c1"), echo_call(4, "last")]
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    out_r, out_w = os.pipe()
    with path.open("rb", buffering=0) as stdin, open(out_w, "wb", buffering=0) as stdout:
        task = asyncio.create_task(serve_stdio(runtime, principal, stdin, stdout))
        try:
            with anyio.fail_after(TIMEOUT_S):  # (it waited for c1 to answer: never)
                await task  # (the end of the file: the session ends)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    with open(out_r, "rb") as out:
        answers = [orjson.loads(line) for line in out.read().splitlines()]
    # the cancelled calls are not answered (as the spec has it), the others in file order
    assert [answer["id"] for answer in answers] == [1, 3, 4]
    assert [answer["result"]["content"][0]["text"] for answer in answers[1:]] == ["after", "last"]
    with SqliteStore(tmp_path / "data" / "mcp0.db") as store:  # (the session closed its own)
        bodies = [orjson.loads(entry.body) for entry in store.read_audit(0, 1000)]
    records = {r["request_id"]: r for r in bodies if r.get("verb") == "call_tool"}
    outcomes = {rid: (r["outcome"], r.get("code")) for rid, r in records.items()}
    cut = ("error", "cancelled")
    assert outcomes == {"c1": cut, "c2": cut, 3: ("allowed", None), 4: ("allowed", None)}


async def test_mcp0_serve_stdio_with_stdout_closed_says_so(tmp_path: Path) -> None:
    data_dir = await data_dir_with_agent(tmp_path, "mute")
    command = [MCP0, "serve", "--stdio", "--agent", "mute", "--data-dir", str(data_dir)]
    shell = " ".join(command) + " >&-"
    done = await anyio.run_process(["sh", "-c", shell], input=b"", check=False)
    assert done.returncode == 1
    assert done.stderr.decode().strip() == (
        "mcp0: error: --stdio speaks MCP on stdin and stdout, and stdout is closed"
    )


def audited(runtime: Runtime) -> list[JSON]:
    return [orjson.loads(e.body) for e in runtime.store.read_audit(0, 100_000)]


async def test_mcp0_serve_stdio_for_an_unknown_agent_fails_with_one_line(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "d")
    await anyio.run_process([MCP0, "agent", "create", "someone", "--data-dir", data_dir])
    done = await anyio.run_process(
        [MCP0, "serve", "--stdio", "--agent", "ghost", "--data-dir", data_dir],
        input=b"",
        check=False,
    )
    assert done.returncode != 0
    assert done.stdout == b""
    assert "ghost" in done.stderr.decode()
    assert done.stderr.count(b"\n") == 1


async def test_mcp0_serve_stdio_refuses_a_token_of_another_agent_than_agent(
    tmp_path: Path,
) -> None:
    # With --agent and MCP0_TOKEN both set, the token was ignored, even a wrong one, and
    # the session ran as --agent's (found by review): the two must name the same agent
    data_dir = str(tmp_path / "d")
    tokens = {}
    for name in ("alice", "bob"):
        created = await anyio.run_process(
            [MCP0, "agent", "create", name, "--data-dir", data_dir, "--json"]
        )
        tokens[name] = orjson.loads(created.stdout)["token"]
    ping = b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n'
    command = [MCP0, "serve", "--stdio", "--agent", "bob", "--data-dir", data_dir]
    for token in (tokens["alice"], "mcp0_not-a-token"):
        done = await anyio.run_process(
            command, input=ping, check=False, env={**os.environ, "MCP0_TOKEN": token}
        )
        assert done.returncode != 0
        assert done.stdout == b""
        assert done.stderr.count(b"\n") == 1
    same = await anyio.run_process(
        command, input=ping, check=False, env={**os.environ, "MCP0_TOKEN": tokens["bob"]}
    )
    assert same.returncode == 0, same.stderr
    assert orjson.loads(same.stdout.splitlines()[0])["result"] == {}


async def test_a_client_closing_stdout_ends_the_session_cleanly(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path / "data")
    runtime.plugins.install(FAULTY_DIR)
    await runtime.agents.spawn("leaver", ["faulty"])
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    os.close(out_r)  # the client is gone before the first answer
    with open(in_r, "rb", buffering=0) as stdin, open(out_w, "wb", buffering=0) as stdout:
        os.write(in_w, orjson.dumps(initialize_message()) + b"\n")  # stdin stays open
        with anyio.fail_after(TIMEOUT_S):
            await serve_stdio(runtime, runtime.agents.principal("leaver"), stdin, stdout)
    os.close(in_w)


async def test_a_terminal_on_stdin_is_made_blocking_again_when_the_session_ends(
    tmp_path: Path,
) -> None:
    # stdin's transport made it non-blocking, and a terminal's is the shell's too; on
    # asyncio's loop the transport closes the file object, and the restore looked for its
    # descriptor there (found by review)
    runtime = make_runtime(tmp_path / "data")
    await runtime.agents.spawn("typist", [])
    controller, terminal = os.openpty()
    out_r, out_w = os.pipe()
    try:
        # (as sys.stdin is: closing the file object leaves the descriptor open)
        with (
            open(terminal, "rb", buffering=0, closefd=False) as stdin,
            open(out_w, "wb", buffering=0) as stdout,
        ):
            ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
            os.write(controller, orjson.dumps(ping) + b"\n\x04")  # then the end of input
            with anyio.fail_after(TIMEOUT_S):
                await serve_stdio(runtime, runtime.agents.principal("typist"), stdin, stdout)
        assert orjson.loads(os.read(out_r, 1 << 16)) == {"jsonrpc": "2.0", "id": 1, "result": {}}
        assert os.get_blocking(terminal)
    finally:
        for fd in (controller, terminal, out_r):
            os.close(fd)


# --- MCP 2026-07-28 over stdio -----------------------------------------------------------------

STATELESS_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


def stateless(rid: Any, method: str, params: JSON | None = None, **meta: Any) -> JSON:
    return {
        "jsonrpc": "2.0",
        "id": rid,
        "method": method,
        "params": {**(params or {}), "_meta": {**STATELESS_META, **meta}},
    }


async def test_an_enveloped_first_request_makes_every_request_stand_alone(tmp_path: Path) -> None:
    async with stdio_server(tmp_path) as peer:
        peer.send(stateless(1, "server/discover"))
        discovered = (await peer.receive())["result"]
        assert discovered["supportedVersions"][0] == "2026-07-28"
        assert discovered["resultType"] == "complete"
        peer.send(stateless(2, "tools/call", {"name": "notes_add", "arguments": {"text": "n"}}))
        added = await peer.receive()
        assert added["result"]["structuredContent"]["note"]["text"] == "n"
        assert added["result"]["resultType"] == "complete"
        peer.send(initialize_message(3))  # too late: this connection speaks 2026-07-28
        refused = (await peer.receive())["error"]
        assert refused["code"] == -32022
        assert "server/discover" in refused["message"]
        peer.send({"jsonrpc": "2.0", "id": 4, "method": "tools/list"})  # no envelope
        assert (await peer.receive())["error"]["code"] == -32602


async def test_an_enveloped_request_in_a_handshake_session_is_refused(tmp_path: Path) -> None:
    async with stdio_server(tmp_path) as peer:
        peer.send(initialize_message(1, "2026-07-28"))
        assert (await peer.receive())["result"]["protocolVersion"] == "2025-11-25"
        peer.send(stateless(2, "tools/list"))
        assert (await peer.receive())["error"]["code"] == -32600


async def test_listen_over_stdio_ends_when_cancelled_or_at_the_end_of_stdin(
    tmp_path: Path,
) -> None:
    async with stdio_server(tmp_path) as peer:
        wanted = {"notifications": {"resourceSubscriptions": ["faulty://counter"]}}
        peer.send(stateless("l1", "subscriptions/listen", wanted))
        ack = await peer.receive()
        assert ack["method"] == "notifications/subscriptions/acknowledged"
        assert ack["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == "l1"
        peer.send(stateless(5, "tools/call", {"name": "faulty_bump"}))
        got = await peer.until_id(5)
        updates = [m for m in got if m.get("method") == "notifications/resources/updated"]
        assert updates[0]["params"]["uri"] == "faulty://counter"
        assert updates[0]["params"]["_meta"] == {"io.modelcontextprotocol/subscriptionId": "l1"}
        peer.send(
            {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "l1"}}
        )
        peer.send(stateless("l2", "subscriptions/listen", {"notifications": {}}))
        assert (await peer.receive())["params"]["_meta"] == {
            "io.modelcontextprotocol/subscriptionId": "l2"
        }
        peer.send(stateless(6, "tools/list"))
        assert (await peer.receive())["id"] == 6  # "l1" sent nothing after its cancel
        peer.end_stdin()  # "l2" ends with its result
        ended = await peer.receive()
        assert ended["id"] == "l2"
        assert ended["result"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == "l2"


async def cancel_while_recorded(peer: StdioPeer, request: JSON, marker: JSON) -> None:
    """Send ``request`` while another process holds the audit log's write lock, cancel it
    once its records wait for the lock (the cancel read: ``marker``, a request that writes
    no record, answered), then let them be written."""
    other = sqlite3.connect(peer.runtime.settings.db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        retries = peer.runtime.audit.stats.busy_retries
        peer.send(request)
        with anyio.fail_after(TIMEOUT_S):
            while peer.runtime.audit.stats.busy_retries == retries:
                await asyncio.sleep(0.01)
        peer.send(cancelled(request["id"]))
        peer.send(marker)
        assert (await peer.receive())["id"] == marker["id"]
        other.execute("ROLLBACK")
    finally:
        other.close()


async def test_a_subscribe_cancelled_while_its_record_is_written_is_answered_as_recorded(
    tmp_path: Path,
) -> None:
    # Answered as cancelled (nothing) while its record was committed as allowed, and the
    # subscription was not made (found by review)
    async with stdio_server(tmp_path) as peer:
        peer.send(initialize_message())
        await peer.receive()
        subscribe = {
            "jsonrpc": "2.0",
            "id": "s",
            "method": "resources/subscribe",
            "params": {"uri": "faulty://counter"},
        }
        await cancel_while_recorded(peer, subscribe, {"jsonrpc": "2.0", "id": 2, "method": "ping"})
        assert await peer.receive() == {"jsonrpc": "2.0", "id": "s", "result": {}}
        [record] = peer.audited("s")
        assert record["outcome"] == "allowed"
        peer.send(call(3, "faulty_bump", {}))
        updated = {"uri": "faulty://counter"}
        assert updated in [m.get("params") for m in await peer.until_id(3)]  # subscribed


async def test_a_listen_cancelled_while_its_records_are_written_is_acknowledged_then_ends(
    tmp_path: Path,
) -> None:
    # It ended unacknowledged while its records were committed as allowed (found by review)
    async with stdio_server(tmp_path) as peer:
        wanted = {"notifications": {"resourceSubscriptions": ["faulty://counter"]}}
        listen = stateless("l", "subscriptions/listen", wanted)
        peer.send(stateless(1, "server/discover"))  # (the server has started: it records)
        assert (await peer.receive())["id"] == 1
        await cancel_while_recorded(peer, listen, stateless(2, "server/discover"))
        ack = await peer.receive()
        assert ack["method"] == "notifications/subscriptions/acknowledged"
        assert ack["params"]["notifications"] == {"resourceSubscriptions": ["faulty://counter"]}
        ended = await peer.receive()  # at once: it was cancelled
        assert ended["id"] == "l"
        assert ended["result"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == "l"
        [record] = peer.audited("l")
        assert record["outcome"] == "allowed"


def call(rid: Any, tool: str, arguments: JSON, token: Any = None) -> JSON:
    params: JSON = {"name": tool, "arguments": arguments}
    if token is not None:
        params["_meta"] = {"progressToken": token}
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params}


def cancelled(rid: Any) -> JSON:
    return {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": rid}}


async def test_a_cancel_in_the_same_write_as_its_request_keeps_it_from_running(
    tmp_path: Path,
) -> None:
    async with stdio_server(tmp_path) as peer:
        peer.send(initialize_message())
        await peer.receive()
        # one write: the server reads all three lines before the call's task first runs
        lines = [call("c1", "faulty_started_then_wait", {}, token="c1"), cancelled("c1")]
        lines.append(call("e1", "faulty_echo", {"text": "after"}))
        peer.send_line(b"\n".join(orjson.dumps(m) for m in lines))
        messages = await peer.until_id("e1")
        assert messages[-1]["result"]["content"][0]["text"] == "after"
        # the call never reached the plugin (it would have sent progress first) ...
        assert not any(m.get("params", {}).get("progressToken") == "c1" for m in messages)
        # ... and is audited as cancelled; its record was submitted before the echo's
        records = peer.audited("c1")
        assert [(r["outcome"], r["code"], r["plugin"]) for r in records] == [
            ("error", "cancelled", "faulty")
        ]
        assert records[0]["verb"] == "call_tool"
        assert records[0]["transport"] == "stdio"
        peer.send({"jsonrpc": "2.0", "id": "c1", "method": "ping"})  # its id is free again
        assert (await peer.receive()) == {"jsonrpc": "2.0", "id": "c1", "result": {}}


async def test_a_prompt_or_completion_cancelled_before_it_ran_is_audited_with_its_digest(
    tmp_path: Path,
) -> None:
    # as a tools/call is: the record of a cancelled one was the only one to hold it
    prompt = {"name": "brief", "arguments": {"topic": "cats"}}
    completion = {
        "ref": {"type": "ref/prompt", "name": "brief"},
        "argument": {"name": "topic", "value": "ca"},
        "context": {"arguments": {"tone": "dry"}},
    }
    async with stdio_server(tmp_path) as peer:
        peer.send(initialize_message())
        await peer.receive()
        lines = [
            {"jsonrpc": "2.0", "id": "g1", "method": "prompts/get", "params": prompt},
            cancelled("g1"),
            {"jsonrpc": "2.0", "id": "k1", "method": "completion/complete", "params": completion},
            cancelled("k1"),
            call("e1", "faulty_echo", {"text": "after"}),
        ]
        peer.send_line(b"\n".join(orjson.dumps(m) for m in lines))
        await peer.until_id("e1")  # (the records of both were submitted before the echo's)
        [got] = peer.audited("g1")
        [completed] = peer.audited("k1")
    assert (got["code"], completed["code"]) == ("cancelled", "cancelled")
    digest = hashlib.sha256(orjson.dumps(prompt["arguments"], option=orjson.OPT_SORT_KEYS))
    assert got["arguments_sha256"] == digest.hexdigest()
    del completion["ref"]  # (the argument completed and its context)
    digest = hashlib.sha256(orjson.dumps(completion, option=orjson.OPT_SORT_KEYS))
    assert completed["arguments_sha256"] == digest.hexdigest()


async def test_requests_5_and_quoted_5_each_have_a_record_with_their_own_id(
    tmp_path: Path,
) -> None:
    """A record holds the request's id as sent, an integer or a string, for a call that ran
    and for one cancelled before it started: held as a string, the records of 5 and "5" read
    the same (found by review)."""
    async with stdio_server(tmp_path) as peer:
        peer.send(initialize_message())
        await peer.receive()
        lines = [call(5, "faulty_echo", {"text": "int"}), call("5", "faulty_echo", {"text": "s"})]
        for rid in (6, "6"):  # (read with their cancels before their tasks first run)
            lines += [call(rid, "faulty_started_then_wait", {}), cancelled(rid)]
        lines.append(call("end", "faulty_echo", {"text": "after"}))
        peer.send_line(b"\n".join(orjson.dumps(m) for m in lines))
        answered: set[Any] = set()
        while answered != {5, "5", "end"}:
            message = await peer.receive()
            assert "error" not in message, message
            answered.add(message.get("id"))
        records = [
            (r["request_id"], r["outcome"], r.get("code"))
            for r in audited(peer.runtime)
            if r.get("request_id") in (5, "5", 6, "6")
        ]
    assert sorted(records, key=repr) == [
        ("5", "allowed", None),
        ("6", "error", "cancelled"),
        (5, "allowed", None),
        (6, "error", "cancelled"),
    ]


async def test_a_cancel_of_initialize_is_ignored(tmp_path: Path) -> None:
    async with stdio_server(tmp_path) as peer:
        # in one write, so that the initialize request is still in flight when the cancel is read
        lines = [initialize_message(rid=7), cancelled(7)]
        peer.send_line(b"\n".join(orjson.dumps(m) for m in lines))
        reply = await peer.receive()
        assert reply["id"] == 7
        assert reply["result"]["protocolVersion"] == "2025-06-18"


async def mcp0(peer: StdioPeer, *args: str) -> None:
    """``mcp0 ARGS`` on the server's data dir: another process, which writes the store."""
    data_dir = str(peer.runtime.settings.data_dir)
    await anyio.run_process([MCP0, *args, "--data-dir", data_dir])


async def tool_names(peer: StdioPeer, rid: str) -> list[str]:
    peer.send({"jsonrpc": "2.0", "id": rid, "method": "tools/list"})
    reply = (await peer.until_id(rid))[-1]
    return [tool["name"] for tool in reply["result"]["tools"]]


async def notices_until(peer: StdioPeer, method: str) -> list[str]:
    """The methods of what the server sends, up to the first ``method``."""
    seen = []
    while not seen or seen[-1] != method:
        seen.append((await peer.receive())["method"])
    return seen


async def test_stdio_hears_list_changed_and_lists_a_plugin_another_process_attached(
    tmp_path: Path,
) -> None:
    async with stdio_server(tmp_path, plugins=("faulty",)) as peer:
        peer.send(initialize_message())
        await peer.receive()
        assert "notes_add" not in await tool_names(peer, "before")
        await mcp0(peer, "agent", "attach", "piper", "notes")
        changed = "notifications/tools/list_changed"
        assert await notices_until(peer, changed) == [changed]
        # notes has no resources or prompts: nothing else came before this answer
        assert "notes_add" in await tool_names(peer, "after")


async def test_a_stdio_session_starts_only_its_agents_plugins_and_those_attached_later(
    tmp_path: Path,
) -> None:
    # It started a worker for every installed plugin, though the session can call only its
    # agent's: a start and a worker's memory each, for nothing (found by review)
    async with stdio_server(tmp_path, plugins=("faulty",)) as peer:
        peer.send(initialize_message())
        await peer.receive()
        plugins = peer.runtime.plugins
        assert plugins.runtimes["faulty"].pids
        assert plugins.runtimes["notes"].pids == []
        # installed while it runs, attached to no one: not started either
        await mcp0(peer, "plugin", "install", str(CHATTY_DIR))
        with anyio.fail_after(TIMEOUT_S):
            while "chatty" not in plugins.runtimes:
                await asyncio.sleep(0.05)
        assert plugins.runtimes["chatty"].pids == []
        # attached by another process: started as the next request sees it, and called
        await mcp0(peer, "agent", "attach", "piper", "notes")
        changed = "notifications/tools/list_changed"
        assert await notices_until(peer, changed) == [changed]  # (seen within 2 s)
        call = {"name": "notes_add", "arguments": {"text": "attached later"}}
        peer.send({"jsonrpc": "2.0", "id": "add", "method": "tools/call", "params": call})
        reply = (await peer.until_id("add"))[-1]
        assert "result" in reply, reply
        assert reply["result"]["structuredContent"]["note"]["text"] == "attached later"
        assert plugins.runtimes["notes"].pids
        assert plugins.runtimes["chatty"].pids == []


async def test_stdio_hears_which_lists_a_reinstalled_plugin_changed(tmp_path: Path) -> None:
    changed = tmp_path / "notes"
    shutil.copytree(NOTES_DIR, changed)
    manifest = orjson.loads((changed / "plugin.json").read_bytes())
    manifest["tools"][0]["description"] += " (now with a better description)"
    (changed / "plugin.json").write_bytes(orjson.dumps(manifest))
    async with stdio_server(tmp_path) as peer:
        peer.send(initialize_message())
        await peer.receive()
        await mcp0(peer, "plugin", "install", "--replace", str(changed))
        notice = "notifications/tools/list_changed"
        assert await notices_until(peer, notice) == [notice]
        peer.send({"jsonrpc": "2.0", "id": "p", "method": "ping"})
        assert await peer.receive() == {"jsonrpc": "2.0", "id": "p", "result": {}}


async def test_two_listen_streams_on_one_stdio_connection_are_each_their_own(
    tmp_path: Path,
) -> None:
    async with stdio_server(tmp_path) as peer:
        peer.send(stateless("tools", "subscriptions/listen", {"notifications": {}}))
        assert (await peer.receive())["method"] == "notifications/subscriptions/acknowledged"
        watch = {"notifications": {"resourceSubscriptions": ["faulty://counter"]}}
        peer.send(stateless("counter", "subscriptions/listen", watch))
        assert (await peer.receive())["method"] == "notifications/subscriptions/acknowledged"
        # ending the first leaves the second listening, and ends without an answer
        cancel = {"requestId": "tools"}
        peer.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": cancel})
        peer.send(stateless(7, "tools/call", {"name": "faulty_bump"}))
        got = await peer.until_id(7)
        updates = [m for m in got if m.get("method") == "notifications/resources/updated"]
        assert [u["params"]["_meta"] for u in updates] == [
            {"io.modelcontextprotocol/subscriptionId": "counter"}
        ]
        assert all(m.get("id") != "tools" for m in got)
        cancel = {"requestId": "counter"}
        peer.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": cancel})
        peer.send(stateless(8, "tools/list"))
        assert (await peer.receive())["id"] == 8  # nothing for "counter", no error


async def test_initialize_on_a_stateless_stdio_connection_names_what_it_serves(
    tmp_path: Path,
) -> None:
    async with stdio_server(tmp_path) as peer:
        peer.send(stateless(1, "server/discover"))
        await peer.receive()
        peer.send(initialize_message(2, "2025-11-25"))
        refused = (await peer.receive())["error"]
        assert refused["code"] == -32022
        assert refused["data"] == {
            "supported": ["2026-07-28"],
            "requested": "2025-11-25",
            "code": "unsupported_protocol_version",  # (it had none: found by review)
        }


async def test_a_cancel_naming_an_object_or_a_list_is_ignored(tmp_path: Path) -> None:
    async with stdio_server(tmp_path) as peer:
        peer.send(initialize_message())
        assert "result" in await peer.receive()
        peer.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        for request_id in ({"x": 1}, [1]):
            note = {"method": "notifications/cancelled", "params": {"requestId": request_id}}
            peer.send({"jsonrpc": "2.0", **note})
        peer.send({"jsonrpc": "2.0", "id": 2, "method": "ping"})
        assert await peer.receive() == {"jsonrpc": "2.0", "id": 2, "result": {}}


def initialize_asked(capabilities: JSON) -> JSON:
    """An initialize that declares ``capabilities`` (what a plugin may ask the client)."""
    message = initialize_message(version="2025-11-25")
    message["params"]["capabilities"] = capabilities
    return message


async def test_a_malformed_answer_fails_its_question_and_gets_no_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # It got an error response under its id: the id of the server's request, which was also
    # the id of the client's own call (found by review).
    async with stdio_server(tmp_path) as peer:
        peer.send(initialize_asked({"elicitation": {}}))
        await peer.receive()
        peer.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        peer.send(call(1, "faulty_ask_between", {}))
        ask = await peer.receive()
        while ask.get("method") != "elicitation/create":
            ask = await peer.receive()
        assert ask["id"] == 1  # the server's first request: the client's call has its id
        with caplog.at_level("WARNING", "mcp_zero.stdio"):
            peer.send({"jsonrpc": "2.0", "id": 1, "result": "not an object"})
            answers = [m for m in await peer.until_id(1) if "method" not in m]
        [answer] = answers  # the call's, and no other
        assert answer["result"]["isError"] is True
        assert "the client's answer is malformed" in answer["result"]["content"][0]["text"]
        assert "the client's answer to request 1 is malformed" in caplog.text


@pytest.mark.parametrize("asked", ["before", "after"])
async def test_at_the_end_of_stdin_questions_to_the_client_fail_at_once(
    tmp_path: Path, asked: str
) -> None:
    # No answer can come once stdin ends: the call waited the 30 s given to running calls,
    # then was cut off (found by review). A question asked after the end fails too.
    async with stdio_server(tmp_path) as peer:
        peer.send(initialize_asked({"elicitation": {}}))
        await peer.receive()
        peer.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        peer.send(call("ask", "faulty_ask_between", {}))
        while asked == "before" and (await peer.receive()).get("method") != "elicitation/create":
            pass
        peer.end_stdin()
        with anyio.fail_after(5):
            answer = (await peer.until_id("ask"))[-1]
        assert "stdin ended: the client can answer no more" in str(answer["result"]["content"])
        asked = [r for r in peer.audited("ask") if r["verb"] == "client_request"]
        assert [(r["outcome"], r["code"]) for r in asked] == [("error", "client_request_failed")]


async def test_sigterm_cancels_a_2026_call_waiting_for_its_retry_and_records_its_question(
    tmp_path: Path,
) -> None:
    """A 2026-07-28 call parked on its input_required answer runs outside any request: at
    SIGTERM (the official client's last step after closing stdin) it was left to the end of
    its worker, recorded as a plugin failure, and the record of its question to the client
    was lost, the audit log closed by then (found by a bug hunt). It is cancelled, as at the
    end of stdin, and both records are written."""
    data_dir = await data_dir_with_agent(tmp_path, "parker")
    async with piped_stdio_server(data_dir, "parker") as server:
        assert server.stdin is not None
        assert server.stdout is not None
        asking = {"io.modelcontextprotocol/clientCapabilities": {"elicitation": {}}}
        server.stdin.write(
            orjson.dumps(stateless("ask", "tools/call", {"name": "faulty_ask_between"}, **asking))
            + b"\n"
        )
        await server.stdin.drain()
        with anyio.fail_after(TIMEOUT_S):
            answer = orjson.loads(await server.stdout.readline())
        assert answer["result"]["resultType"] == "input_required", answer
        server.send_signal(signal.SIGTERM)
        with anyio.fail_after(TIMEOUT_S):
            assert await server.wait() == 0
    with SqliteStore(data_dir / "mcp0.db") as store:
        records = [orjson.loads(entry.body) for entry in store.read_audit(0, 1000)]
    ended = sorted(
        (r["verb"], r["outcome"], r.get("code")) for r in records if r.get("request_id") == "ask"
    )
    assert ended == [
        ("call_tool", "error", "cancelled"),
        ("client_request", "error", "cancelled"),
    ]
