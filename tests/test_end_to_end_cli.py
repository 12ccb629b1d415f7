"""End to end, as a user runs it: the `mcp0` CLI, a real server process, the official MCP client.

- `mcp0 serve` on embedded defaults (bundled `notes` plugin), an agent made with
  `mcp0 agent create --json`, and the official `mcp` client over streamable HTTP
  with the agent's bearer token, then over stdio (`mcp0 serve --stdio`);
- durability: `kill -9` the server under concurrent load, restart it on the same
  data dir, and check that the audit hash chain verifies and that every call
  whose answer arrived has its audit record.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from certificates import self_signed_certificate
from mcp_zero.errors import SERVER_STOPPING
from mcp_zero.rpc.stdio import MAX_QUEUED
from mcp_zero.sandbox import proctree
from plugin_builders import loading_plugin, write_plugin

MCP0 = str(Path(sys.executable).parent / "mcp0")
REPO = Path(__file__).resolve().parent.parent
FAULTY_DIR = Path(__file__).parent / "plugins" / "faulty"
KIT_DIR = Path(__file__).parent / "sandbox" / "kit"
NOTES_TOOLS = {"notes_add", "notes_search", "notes_list", "notes_delete"}
START_TIMEOUT_S = 30.0
CLI_TIMEOUT_S = 60.0
CLIENT_TIMEOUT_S = 30.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def mcp0(*args: str) -> str:
    """Runs the mcp0 CLI; returns its stdout, fails the test with its stderr on a non-zero exit."""
    done = subprocess.run([MCP0, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    if done.returncode != 0:
        pytest.fail(f"mcp0 {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A `mcp0 serve` subprocess on 127.0.0.1; its output goes to `log`."""

    data_dir: Path
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    tls: tuple[Path, Path] | None = None  # certificate and key: serve HTTPS

    @property
    def base(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/mcp"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What a client trusts to reach this server: its own certificate, when it has one."""
        return ssl.create_default_context(cafile=str(self.tls[0])) if self.tls else True

    def start(self) -> None:
        """Starts the server and waits (bounded) until GET /readyz answers 200."""
        tls = ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])] if self.tls else []
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(
                [
                    MCP0,
                    "serve",
                    "--data-dir",
                    str(self.data_dir),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    *tls,
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        with httpx2.Client(timeout=2.0, verify=self.verify) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(f"mcp0 serve exited {self.proc.returncode}:\n{self.output()}")
                try:
                    if http.get(f"{self.base}/readyz").status_code == 200:
                        return
                except httpx2.TransportError:
                    pass
                time.sleep(0.05)
        pytest.fail(f"mcp0 serve not ready after {START_TIMEOUT_S:.0f}s:\n{self.output()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=15)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A started server on a fresh data dir (first start: bundled example plugin installed)."""
    srv = Server(tmp_path / "data", free_port(), tmp_path / "serve.log")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def create_agent(data_dir: Path, name: str) -> str:
    """`mcp0 agent create NAME --plugin notes --json`; returns the agent's bearer token."""
    created = json.loads(
        mcp0("agent", "create", name, "--plugin", "notes", "--data-dir", str(data_dir), "--json")
    )
    assert created["name"] == name
    token: str = created["token"]
    return token


def text_of(result: Any) -> str:
    return "\n".join(block.text for block in result.content if getattr(block, "text", None))


async def add_then_search(client: Client) -> None:
    """What a user does first: list the tools, add a note, find it again."""
    tools = await client.list_tools()
    assert {tool.name for tool in tools.tools} >= NOTES_TOOLS
    marker = f"marker{uuid.uuid4().hex[:12]}"
    added = await client.call_tool("notes_add", {"text": f"buy milk {marker}", "tags": ["e2e"]})
    assert not added.is_error, text_of(added)
    assert added.structured_content is not None
    note = added.structured_content["note"]
    assert note["text"] == f"buy milk {marker}"
    assert note["tags"] == ["e2e"]
    found = await client.call_tool("notes_search", {"query": marker})
    assert not found.is_error, text_of(found)
    assert found.structured_content is not None
    assert [n["id"] for n in found.structured_content["notes"]] == [note["id"]]
    assert marker in text_of(found)


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_official_client_over_http_lists_adds_and_finds_a_note(
    server: Server, mode: Any
) -> None:
    token = create_agent(server.data_dir, "e2e-http")
    async with httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {token}"}, timeout=CLIENT_TIMEOUT_S
    ) as http:
        with anyio.fail_after(CLIENT_TIMEOUT_S):
            transport = streamable_http_client(server.url, http_client=http)
            async with Client(transport, mode=mode) as client:
                await add_then_search(client)


def test_the_readmes_python_client_finds_the_note_the_curl_added(server: Server) -> None:
    # It never closed its HTTP client: under -W error it ended with a ResourceWarning
    # (found by review)
    token = create_agent(server.data_dir, "readme")
    readme = (REPO / "README.md").read_text()
    snippet = readme.split("With the official MCP Python client:\n\n```python\n")[1]
    snippet = snippet.split("```")[0]
    assert 'TOKEN = "mcp0_Jl…"' in snippet
    assert "http://127.0.0.1:8390/mcp" in snippet
    snippet = snippet.replace('"mcp0_Jl…"', repr(token)).replace(
        "http://127.0.0.1:8390/mcp", server.url
    )
    with httpx2.Client(timeout=CLIENT_TIMEOUT_S) as http:  # the README's curl, before it
        added = http.post(
            server.url,
            headers={"Authorization": f"Bearer {token}"},
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
                "name": "notes_add", "arguments": {"text": "buy milk", "tags": ["home"]}}},
        )  # fmt: skip
    assert "result" in added.json(), added.text
    ran = subprocess.run(
        [sys.executable, "-W", "error", "-c", snippet],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr == ""  # (a warning left unraised at exit is printed there)
    assert "'text': 'buy milk'" in ran.stdout
    assert "is_error=False" in ran.stdout


@pytest.mark.anyio
async def test_official_client_over_https_lists_adds_and_finds_a_note(tmp_path: Path) -> None:
    tls = self_signed_certificate(tmp_path)
    srv = Server(tmp_path / "data", free_port(), tmp_path / "serve.log", tls=tls)
    srv.start()
    try:
        assert f"listening on https://127.0.0.1:{srv.port}/mcp" in srv.output()
        token = create_agent(srv.data_dir, "e2e-https")
        async with httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {token}"},
            timeout=CLIENT_TIMEOUT_S,
            verify=srv.verify,
        ) as http:
            with anyio.fail_after(CLIENT_TIMEOUT_S):
                async with Client(streamable_http_client(srv.url, http_client=http)) as client:
                    await add_then_search(client)
            # plain HTTP on the HTTPS port gets no answer, and the server goes on
            with pytest.raises(httpx2.TransportError):
                await http.get(f"http://127.0.0.1:{srv.port}/healthz")
            assert (await http.get(f"{srv.base}/healthz")).status_code == 200
    finally:
        srv.stop()


def test_a_certificate_without_its_key_or_with_a_wrong_one_is_one_line(tmp_path: Path) -> None:
    cert, _ = self_signed_certificate(tmp_path)
    for tls in (["--tls-cert", str(cert)], ["--tls-cert", str(cert), "--tls-key", str(cert)]):
        done = subprocess.run(
            [MCP0, "serve", "--port", "0", "--data-dir", str(tmp_path / "data"), *tls],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
        )
        assert done.returncode == 1
        assert done.stderr.startswith("mcp0: error: ")
        assert "tls" in done.stderr.lower()
        assert done.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("cert", "key", "error"),
    [
        ("cert", "cert", "the TLS key {cert} holds no PEM private key, but a certificate"),
        ("key", "key", "the TLS certificate {key} holds no PEM certificate, but a private key"),
        ("cert", "other", "the TLS key {other} is not the key of the certificate in {cert}"),
        ("cert", "missing", "cannot read the TLS key {missing}: No such file or directory"),
    ],
)
def test_a_certificate_or_key_that_will_not_do_is_named_with_what_is_wrong(
    tmp_path: Path, cert: str, key: str, error: str
) -> None:
    # the key file given the certificate was "[SSL] PEM lib (_ssl.c:3926)" (found by review)
    (tmp_path / "other").mkdir()
    files = dict(zip(("cert", "key"), self_signed_certificate(tmp_path), strict=True))
    files["other"] = self_signed_certificate(tmp_path / "other")[1]
    files["missing"] = tmp_path / "missing.pem"
    tls = ["--tls-cert", str(files[cert]), "--tls-key", str(files[key])]
    done = subprocess.run(
        [MCP0, "serve", "--port", "0", "--data-dir", str(tmp_path / "data"), *tls],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert done.returncode == 1
    assert done.stderr == f"mcp0: error: {error.format(**files)}\n"
    assert not (tmp_path / "data").exists()


@pytest.mark.anyio
@pytest.mark.parametrize(("mode", "version"), [("legacy", "2025-11-25"), ("auto", "2026-07-28")])
async def test_official_client_over_stdio_lists_adds_and_finds_a_note(
    server: Server, mode: str, version: str
) -> None:
    create_agent(server.data_dir, "e2e-stdio")
    server.stop()  # one server process on a data dir at a time
    params = StdioServerParameters(
        command=MCP0,
        args=["serve", "--stdio", "--agent", "e2e-stdio", "--data-dir", str(server.data_dir)],
    )
    with anyio.fail_after(CLIENT_TIMEOUT_S):
        async with Client(params, mode=mode) as client:
            assert client.protocol_version == version
            await add_then_search(client)


# --- durability -------------------------------------------------------------------------------


async def drive_until_killed(
    url: str, token: str, answered: dict[str, bool], workers: int, kill_after: int, kill: Any
) -> None:
    """`workers` concurrent clients call notes_add until the server dies.

    Every call has a unique JSON-RPC id; each call whose answer arrived goes to
    `answered` (id -> whether it succeeded: a JSON-RPC error such as a quota
    refusal is an answer too, and audited as well). Once `kill_after` calls have
    succeeded, `kill()` runs. Bounded: each client stops after its first
    transport error or 2,000 calls.
    """
    headers = {
        "Authorization": f"Bearer {token}",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2025-11-25",
    }
    killed = asyncio.Event()

    async def client(worker: int, http: httpx2.AsyncClient) -> None:
        for n in range(2000):
            request_id = f"kill9-{worker}-{n}"
            body = {
                "jsonrpc": "2.0",
                "id": request_id,
                "method": "tools/call",
                "params": {"name": "notes_add", "arguments": {"text": f"durable {request_id}"}},
            }
            try:
                response = await http.post(url, json=body)
            except httpx2.TransportError:
                assert killed.is_set(), "the server failed before it was killed"
                return
            assert response.status_code == 200, response.text
            message = decode(response)
            succeeded = "result" in message and not message["result"].get("isError")
            answered[request_id] = succeeded
            if succeeded and sum(answered.values()) >= kill_after and not killed.is_set():
                killed.set()
                kill()

    limits = httpx2.Limits(max_connections=workers)
    async with httpx2.AsyncClient(
        verify=False, headers=headers, timeout=10.0, limits=limits
    ) as http:
        await initialize(http, url)
        async with asyncio.TaskGroup() as group:
            for worker in range(workers):
                group.create_task(client(worker, http))
    assert killed.is_set(), "the load ended before the server was killed"


async def initialize(http: httpx2.AsyncClient, url: str) -> None:
    """The MCP handshake; keeps the session id on `http` when the server hands one out."""
    hello = {
        "jsonrpc": "2.0",
        "id": "init",
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "e2e-durability", "version": "1"},
        },
    }
    response = await http.post(url, json=hello)
    assert response.status_code == 200, response.text
    assert "result" in decode(response)
    session = response.headers.get("mcp-session-id")
    if session:
        http.headers["Mcp-Session-Id"] = session
    done = await http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert done.status_code in (200, 202), done.text


def decode(response: httpx2.Response) -> dict[str, Any]:
    """The JSON-RPC message of a JSON or a single-event SSE response."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        data = [ln[5:] for ln in response.text.splitlines() if ln.startswith("data:")]
        message: dict[str, Any] = json.loads(next(d for d in data if d.strip()))
        return message
    body: dict[str, Any] = response.json()
    return body


def audit_records(data_dir: Path) -> list[dict[str, Any]]:
    """Every audit record, read page by page with `mcp0 audit list --after SEQ --json`."""
    records: list[dict[str, Any]] = []
    while True:
        after = records[-1]["seq"] if records else 0
        page = json.loads(
            mcp0(
                "audit",
                "list",
                "--data-dir",
                str(data_dir),
                "--json",
                "--after",
                str(after),
                "--limit",
                "5000",
            )
        )
        if not page:
            return records
        records.extend(page)


@pytest.mark.slow
def test_every_answered_call_is_audited_after_kill_9(server: Server) -> None:
    token = create_agent(server.data_dir, "e2e-durable")
    answered: dict[str, bool] = {}
    # As many clients as the notes plugin runs calls at once (max_concurrency in its manifest).
    asyncio.run(
        asyncio.wait_for(
            drive_until_killed(server.url, token, answered, 8, 400, server.kill9),
            timeout=120,
        )
    )
    assert sum(answered.values()) >= 400

    server.start()  # recovery on the same data dir
    verified = json.loads(mcp0("audit", "verify", "--data-dir", str(server.data_dir), "--json"))
    assert verified["ok"] is True, verified
    assert verified["count"] >= len(answered)

    records = audit_records(server.data_dir)
    audited = {r["request_id"]: r for r in records if r.get("agent") == "e2e-durable"}
    print(
        f"answered {len(answered)} calls ({sum(answered.values())} succeeded) before kill -9; "
        f"{len(audited)} audited calls of the agent, {verified['count']} records in the log"
    )
    missing = [rid for rid in answered if rid not in audited]
    assert not missing, f"{len(missing)} answered calls have no audit record, e.g. {missing[:5]}"
    assert all("notes_add" in audited[rid]["resource"] for rid in answered)
    assert {audited[rid]["outcome"] for rid, ok in answered.items() if ok} == {"allowed"}


def test_of_two_plugin_installs_at_once_one_wins_and_the_other_says_why(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    mcp0("agent", "create", "someone", "--data-dir", data_dir)  # the data dir, laid out once
    source = tmp_path / "faulty"
    shutil.copytree(FAULTY_DIR, source, ignore=shutil.ignore_patterns("__pycache__"))
    (source / "blob.bin").write_bytes(bytes(32 << 20))  # a copy that takes a while
    installs = [
        subprocess.Popen(
            [MCP0, "plugin", "install", str(source), "--data-dir", data_dir],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    said = [p.communicate(timeout=CLI_TIMEOUT_S)[1] for p in installs]
    done = sorted(zip((p.returncode for p in installs), said, strict=True))
    assert done[0] == (0, "")
    assert done[1] == (
        1,
        "mcp0: error: plugin 'faulty' is already installed (version 1.0.0); remove it first "
        "or install with --replace\n",
    )
    listed = json.loads(mcp0("plugin", "list", "--data-dir", data_dir, "--json"))
    assert [p["name"] for p in listed] == ["faulty"]


def test_serve_on_a_port_in_use_fails_in_one_line_and_creates_nothing(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            [MCP0, "serve", "--port", str(port), "--data-dir", str(tmp_path / "data")],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
        )
    assert done.returncode == 1
    assert done.stderr.startswith(f"mcp0: error: cannot listen on 127.0.0.1:{port}: ")
    assert "another server" in done.stderr
    assert done.stderr.count("\n") == 1  # no traceback
    assert not (tmp_path / "data").exists()  # nor a first start whose token nobody saw


def test_serve_stdio_on_a_missing_data_dir_fails_and_creates_nothing(tmp_path: Path) -> None:
    done = subprocess.run(
        [MCP0, "serve", "--stdio", "--agent", "claude", "--data-dir", str(tmp_path / "typo")],
        input='{"jsonrpc":"2.0","id":1,"method":"ping"}\n',
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("mcp0: error: no MCP-ZERO data dir at ")
    assert done.stdout == ""
    assert not (tmp_path / "typo").exists()


def test_serve_on_an_address_not_of_this_machine_says_so(tmp_path: Path) -> None:
    done = subprocess.run(
        [MCP0, "serve", "--host", "192.0.2.1", "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("mcp0: error: cannot listen on 192.0.2.1:")
    assert "--host" in done.stderr
    assert "another server" not in done.stderr
    assert done.stderr.count("\n") == 1


FAULTY_DIR = Path(__file__).parent / "plugins" / "faulty"


async def nap_calls(url: str, token: str, seconds: float, count: int, then: Any) -> list[Any]:
    """`count` concurrent faulty_nap calls; `then()` runs once they are all in flight. A call
    that gets no answer (the server killed) is its exception."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
    async with httpx2.AsyncClient(headers=headers, timeout=CLIENT_TIMEOUT_S) as http:

        async def nap(n: int) -> Any:
            body = {
                "jsonrpc": "2.0",
                "id": f"term-{n}",
                "method": "tools/call",
                "params": {"name": "faulty_nap", "arguments": {"seconds": seconds}},
            }
            response = await http.post(url, json=body)
            return response.status_code, response.json()

        calls = [asyncio.ensure_future(nap(n)) for n in range(count)]
        await asyncio.sleep(seconds / 3)  # each is napping in the plugin now
        then()
        return list(await asyncio.gather(*calls, return_exceptions=True))


def sleepy_agent(server: Server) -> str:
    """Installs the faulty plugin (its faulty_nap tool sleeps) into a running server and
    creates an agent with it; returns the agent's token once the server serves the plugin."""
    data_dir = str(server.data_dir)
    mcp0("plugin", "install", str(FAULTY_DIR), "--data-dir", data_dir)
    created = mcp0(
        "agent", "create", "sleepy", "--plugin", "faulty", "--data-dir", data_dir, "--json"
    )
    token: str = json.loads(created)["token"]
    admin = {"Authorization": f"Bearer {(server.data_dir / 'admin.token').read_text().strip()}"}
    deadline = time.monotonic() + START_TIMEOUT_S
    with httpx2.Client(headers=admin, timeout=5) as http:  # until the server has taken it up
        while http.get(f"{server.base}/api/v1/plugins/faulty").json().get("running") is not True:
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.05)
    return token


def call_faulty(server: Server, token: str, tool: str, arguments: dict[str, Any]) -> Any:
    """One tools/call over plain HTTP; the JSON-RPC answer."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool}}
    body["params"]["arguments"] = arguments
    with httpx2.Client(headers=headers, timeout=CLIENT_TIMEOUT_S) as http:
        return http.post(server.url, json=body).json()


def wait_gone(pid: int, server: Server, case: str) -> None:
    """Until process ``pid`` has ended (bounded): gone, or a zombie that is not the server's
    (the server reaps what it inherits; once it has exited, that is init's or another's)."""
    deadline = time.monotonic() + 15
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # gone (also between two looks)
            return
        state, parent = stat.rsplit(")", 1)[-1].split()[:2]
        assert server.proc is not None
        if state == "Z" and int(parent) != server.proc.pid:
            return
        assert time.monotonic() < deadline, (
            f"{case}: process {pid} is left ({state}, parent {parent}):\n{server.output()}"
        )
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def test_a_daemon_that_forks_on_and_on_is_ended_with_its_group(server: Server) -> None:
    # Each sweep found the stray a zombie already, its child re-parented to the server and
    # out of the walk of its tree: it ran on, at full CPU, for tens of seconds (found by
    # review). Its process group, which every generation keeps, is killed whole now.
    token = sleepy_agent(server)
    heartbeat = server.data_dir / "plugin-data" / "faulty" / "runner.beat"
    answer = call_faulty(server, token, "faulty_runner", {"heartbeat": str(heartbeat)})
    assert answer.get("result", {}).get("content", [{}])[0].get("text") == "runner started", answer
    deadline = time.monotonic() + 15
    while not heartbeat.exists():
        assert time.monotonic() < deadline, "the runner never beat"
        time.sleep(0.05)
    time.sleep(3)  # sweeps come every second
    before = heartbeat.read_text()
    time.sleep(1.5)
    assert heartbeat.read_text() == before, "the runner still runs"
    assert not alive(int(before))


def test_nothing_a_plugin_starts_outlives_its_worker(server: Server, tmp_path: Path) -> None:
    # A process a plugin starts is orphaned at once (its parent exits): it comes to the
    # server (a subreaper), not init. One in its worker's process group (`cmd &`) lives as
    # long as the worker; one that left the group (setsid: a daemon) is killed at once.
    # Either way none outlives the worker: a crash, a call past its time, a server stop.
    token = sleepy_agent(server)

    def start(case: str, then: str, *, detach: bool, seconds: float = 600) -> tuple[int, Any]:
        pidfile = server.data_dir / "plugin-data" / "faulty" / f"{case}.pid"  # may write there
        arguments = {"pidfile": str(pidfile), "then": then, "detach": detach, "seconds": seconds}
        answer = call_faulty(server, token, "faulty_daemon", arguments)
        return int(pidfile.read_text()), answer

    daemon, answer = start("daemon", "return", detach=True)
    assert answer["result"]["content"][0]["text"] == "daemon started", answer
    wait_gone(daemon, server, "a daemon that left its worker's group")
    assert "left outside its worker's process group" in server.output()

    # one that ends by itself is reaped by the server (a zombie per `cmd &` would pile up)
    short, _ = start("short", "return", detach=False, seconds=0.1)
    wait_gone(short, server, "a zombie the server adopted")
    assert server.proc is not None
    assert not [
        pid
        for pid, proc in proctree.processes().items()
        if proc.ppid == server.proc.pid and proc.state == "Z"
    ]

    for then in ("crash", "hang"):
        background, answer = start(then, then, detach=False)
        assert "error" in answer, answer  # the worker crashed, or the call timed out
        wait_gone(background, server, f"a process in the group of a worker that {then}ed")

    background, answer = start("stop", "return", detach=False)
    assert answer["result"]["content"][0]["text"] == "daemon started", answer
    time.sleep(2.5)  # two sweeps: it is its live worker's
    assert alive(background)
    server.stop()  # the worker exits with the server
    wait_gone(background, server, "a process of a worker the server stopped")
    assert "Traceback" not in server.output()


def test_what_plugins_left_running_after_kill_9_ends_at_the_next_start(
    server: Server, tmp_path: Path
) -> None:
    # kill -9 of the server ends its workers (their parent-death signal), but what their
    # plugins started runs on under init; the next server on the data dir ends it.
    token = sleepy_agent(server)
    pidfile = server.data_dir / "plugin-data" / "faulty" / "left.pid"  # it may write there
    arguments = {"pidfile": str(pidfile), "then": "return", "detach": False, "seconds": 600}
    answer = call_faulty(server, token, "faulty_daemon", arguments)
    assert answer["result"]["content"][0]["text"] == "daemon started", answer
    left = int(pidfile.read_text())
    plugin_data = str((server.data_dir / "plugin-data").resolve())
    assert left not in proctree.left_behind(plugin_data)  # its server runs: its own

    server.kill9()
    assert alive(left)  # nothing ended it
    assert left in proctree.left_behind(plugin_data)
    server.start()
    wait_gone(left, server, "a process a plugin of a killed server left")
    assert "left behind" in server.output()


def test_what_plugins_left_with_an_environment_of_their_own_ends_at_the_next_start(
    server: Server,
) -> None:
    # A process a plugin starts with an environment of its own (`Popen(cmd, env={})`) carries
    # no trace of its worker there: after kill -9 of the server it ran on for good (found by
    # review). It is still in its worker's session, which the server had listed.
    token = sleepy_agent(server)
    [record] = (server.data_dir / "workers").glob("*.json")
    # As if the server had last said it ran a minute ago: what started since would be no
    # leftover (a pid taken again after its death), unless the server says so again
    minute_ago = time.time() - 60
    os.utime(record, (minute_ago, minute_ago))
    pidfile = server.data_dir / "plugin-data" / "faulty" / "clean.pid"
    arguments = {"pidfile": str(pidfile), "then": "return", "clean_env": True}
    answer = call_faulty(server, token, "faulty_daemon", arguments)
    assert answer["result"]["content"][0]["text"] == "daemon started", answer
    left = int(pidfile.read_text())
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while record.stat().st_mtime < time.time() - 1.5:  # its next heartbeat
        assert time.monotonic() < deadline, "the server no longer touches its record"
        time.sleep(0.05)
    # one of the same shape that no worker started: kept
    stranger = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], env={}, start_new_session=True
    )
    try:
        server.kill9()
        assert alive(left)  # nothing ended it
        server.start()
        wait_gone(
            left, server, "a process with an empty environment a plugin of a killed server left"
        )
        assert "left behind" in server.output()
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def _descendants(pid: int) -> list[int]:
    """``pid``'s processes below it, from /proc (its plugin workers among them)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[1])
    below, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        below += children
        frontier += children
    return below


@pytest.mark.parametrize("how", ["SIGTERM", "SIGHUP", "SIGQUIT", "SIGTERM to every process"])
def test_sigterm_lets_calls_in_flight_finish_and_audits_them(server: Server, how: str) -> None:
    # SIGHUP (a closed terminal or ssh session) and SIGQUIT killed the server on the spot,
    # and systemd's KillMode=control-group SIGTERMs the workers too, which died under the
    # calls given their grace (found by review)
    data_dir = str(server.data_dir)
    token = sleepy_agent(server)
    assert server.proc is not None
    proc = server.proc
    number = getattr(signal, how.split()[0])

    def stop() -> None:
        targets = [proc.pid, *(_descendants(proc.pid) if "every" in how else [])]
        for pid in targets:
            os.kill(pid, number)

    answers = asyncio.run(nap_calls(server.url, token, 1.0, 3, stop))
    assert proc.wait(timeout=15) == 0, server.output()
    assert "stopping: 3 request(s) in flight get up to 5 s" in server.output()
    assert "cut off" not in server.output()
    for status, reply in answers:
        assert status == 200, reply
        assert reply["result"]["content"][0]["text"] == "napped 1.0", reply
    naps = [r for r in audit_records(server.data_dir) if r.get("resource") == "faulty_nap"]
    assert sorted(r["request_id"] for r in naps) == ["term-0", "term-1", "term-2"]
    assert {r["outcome"] for r in naps} == {"allowed"}
    verified = json.loads(mcp0("audit", "verify", "--data-dir", data_dir, "--json"))
    assert verified["ok"] is True, verified


def test_calls_a_policy_audits_before_they_run_are_in_the_log_after_kill_9(
    server: Server,
) -> None:
    """What `@audit("before")` is for: the server dies while the plugin acts, and the log
    still says the actions were started (and that they never ended)."""

    def loads() -> int:  # the server's records of policy files it loaded
        records = audit_records(server.data_dir)
        return sum(r["verb"] == "load_policies" and r["outcome"] == "allowed" for r in records)

    before = loads()
    (server.data_dir / "policies" / "audited.cedar").write_text(
        '@id("faulty-audited-first")\n@audit("before")\n'
        'permit (principal is Agent, action == Action::"call_tool", resource in Plugin::"faulty")'
        "\nwhen { principal.plugins.contains(resource.plugin) };\n"
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while loads() == before:  # (in force once it reads the same twice)
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.1)
    token = sleepy_agent(server)
    answers = asyncio.run(nap_calls(server.url, token, 3.0, 3, server.kill9))
    assert all(isinstance(a, httpx2.TransportError) for a in answers), answers
    server.start()
    naps = [r for r in audit_records(server.data_dir) if r.get("resource") == "faulty_nap"]
    assert sorted((r["request_id"], r["outcome"]) for r in naps) == [
        ("term-0", "intent"),
        ("term-1", "intent"),
        ("term-2", "intent"),
    ]
    assert all(r["obligations"] == ["audit:before"] for r in naps)
    verified = json.loads(mcp0("audit", "verify", "--data-dir", str(server.data_dir), "--json"))
    assert verified["ok"] is True, verified


def test_calls_still_running_after_the_shutdown_grace_are_answered_and_audited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MCP0_SHUTDOWN_GRACE_S", "0.3")
    server = Server(tmp_path / "data", free_port(), tmp_path / "serve.log")
    server.start()
    try:
        token = sleepy_agent(server)
        assert server.proc is not None
        proc = server.proc
        admin = {"Authorization": f"Bearer {(server.data_dir / 'admin.token').read_text().strip()}"}

        async def calls_and_an_execute() -> tuple[list[Any], httpx2.Response]:
            # (the admin API's execute too: it got no answer at all, found by review)
            async with httpx2.AsyncClient(headers=admin, timeout=CLIENT_TIMEOUT_S) as http:
                body = {"tool": "faulty_nap", "arguments": {"seconds": 1.4}}
                executing = asyncio.ensure_future(
                    http.post(
                        f"{server.base}/api/v1/agents/sleepy/execute",
                        json={**body, "request_id": "term-admin"},
                    )
                )
                answers = await nap_calls(server.url, token, 1.4, 2, proc.terminate)
                return answers, await executing

        answers, executed = asyncio.run(calls_and_an_execute())
        assert proc.wait(timeout=15) == 0, server.output()
    finally:
        server.stop()
    assert "stopping: 3 request(s) still running after 0.3 s are cut off" in server.output()
    for status, reply in answers:  # an answer the client can act on, not a dropped connection
        assert status == 200, reply
        assert reply["error"]["code"] == SERVER_STOPPING, reply
        assert "shutting down" in reply["error"]["message"]
    assert executed.status_code == 503, executed.text
    assert executed.json()["error"]["code"] == "server_stopping"
    naps = [r for r in audit_records(server.data_dir) if r.get("resource") == "faulty_nap"]
    assert sorted(r["request_id"] for r in naps) == ["term-0", "term-1", "term-admin"]
    assert {(r["outcome"], r["code"]) for r in naps} == {("error", "cancelled")}


def slow_reader(directory: Path, version: str) -> Path:
    """A plugin whose tool waits for a ``go`` file in its data dir, then answers with the
    ``data.txt`` beside its module (which says ``version``)."""
    directory.mkdir()
    (directory / "slow.py").write_text(
        "import time\n"
        "from pathlib import Path\n"
        "from mcp_zero.plugin import Plugin\n"
        "plugin = Plugin('slow')\n"
        "@plugin.tool('slow_read')\n"
        "def slow_read(ctx) -> str:\n"
        "    (ctx.data_dir / 'started').touch()\n"
        "    while not (ctx.data_dir / 'go').exists():\n"
        "        time.sleep(0.02)\n"
        "    return (Path(__file__).parent / 'data.txt').read_text()\n"
    )
    (directory / "data.txt").write_text(f"data of {version}")
    manifest = {
        "name": "slow",
        "version": version,
        "abi": 1,
        "entry": "slow:plugin",
        "tools": [{"name": "slow_read", "description": "read", "inputSchema": {"type": "object"}}],
    }
    (directory / "plugin.json").write_text(json.dumps(manifest))
    return directory


@pytest.mark.anyio
async def test_a_call_in_flight_reads_its_files_though_the_plugin_is_replaced(
    server: Server, tmp_path: Path
) -> None:
    data = str(server.data_dir)
    mcp0("plugin", "install", str(slow_reader(tmp_path / "v1", "1.0.0")), "--data-dir", data)
    (old,) = (server.data_dir / "plugins" / "slow").iterdir()
    created = mcp0("agent", "create", "ada", "--plugin", "slow", "--data-dir", data, "--json")
    token = json.loads(created)["token"]
    plugin_data = server.data_dir / "plugin-data" / "slow"
    async with httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {token}"}, timeout=CLIENT_TIMEOUT_S
    ) as http:
        with anyio.fail_after(CLIENT_TIMEOUT_S):
            async with Client(streamable_http_client(server.url, http_client=http)) as client:
                while not (await client.list_tools()).tools:  # the server saw the install
                    await asyncio.sleep(0.05)
                call = asyncio.create_task(client.call_tool("slow_read", {}))
                while not (plugin_data / "started").exists():
                    await asyncio.sleep(0.02)
                v2 = slow_reader(tmp_path / "v2", "2.0.0")
                await asyncio.to_thread(
                    mcp0, "plugin", "install", str(v2), "--replace", "--data-dir", data
                )
                (plugin_data / "go").touch()
                result = await call
                assert not result.is_error, text_of(result)
                assert text_of(result) == "data of 1.0.0"
                while old.exists():  # the server deletes the old copy once its calls ended
                    await asyncio.sleep(0.05)
                (new,) = (server.data_dir / "plugins" / "slow").iterdir()
                assert (new / "data.txt").read_text() == "data of 2.0.0"


def _stdio_session(*requests: dict[str, Any]) -> bytes:
    """The lines of a stdio session: initialize (id 1), initialized, then ``requests``
    (each given its ``"jsonrpc"``)."""
    initialize = {
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "tests", "version": "0"},
        },
    }
    messages = [initialize, {"method": "notifications/initialized"}, *requests]
    return b"".join(json.dumps({"jsonrpc": "2.0", **m}).encode() + b"\n" for m in messages)


def _napping_stdio(
    tmp_path: Path, *, with_token: bool = False
) -> tuple[subprocess.Popen[bytes], str]:
    """`mcp0 serve --stdio` as agent napper (``with_token``: opened with its token in
    MCP0_TOKEN, not --agent), initialized, its call of the kit's slow_async (4.5 s of its
    5 s timeout, id 2) under way; and its data dir."""
    data_dir = str(tmp_path / "data")
    mcp0("plugin", "install", str(KIT_DIR), "--data-dir", data_dir)
    created = mcp0("agent", "create", "napper", "--plugin", "kit", "--data-dir", data_dir, "--json")
    if with_token:
        opened = {"MCP0_TOKEN": json.loads(created)["token"]}
    else:
        opened = {"MCP0_AGENT": "napper"}
    log = os.open(tmp_path / "stdio.log", os.O_WRONLY | os.O_CREAT, 0o600)  # its stderr
    try:
        proc = subprocess.Popen(
            [MCP0, "serve", "--stdio", "--data-dir", data_dir],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, **opened},
        )
    finally:
        os.close(log)
    assert proc.stdin is not None
    assert proc.stdout is not None
    nap = {"name": "slow_async", "arguments": {"seconds": 4.5}}
    proc.stdin.write(_stdio_session({"id": 2, "method": "tools/call", "params": nap}))
    proc.stdin.flush()
    assert json.loads(proc.stdout.readline())["id"] == 1  # initialized: the nap is next
    time.sleep(0.5)  # the call under way
    return proc, data_dir


def _the_nap(data_dir: str) -> dict[str, Any]:
    records = _audit(data_dir)
    naps = [r for r in records if r.get("resource") == "slow_async"]
    assert len(naps) == 1, records
    return naps[0]


def test_sigterm_ends_a_stdio_session_recording_the_call_it_cut_short(tmp_path: Path) -> None:
    # The official client leaves by closing stdin, waiting 2 s, then SIGTERM: the server
    # died at once, and a call still running got no audit record at all (found by review)
    proc, data_dir = _napping_stdio(tmp_path)
    with proc:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    nap = _the_nap(data_dir)
    assert (nap["outcome"], nap.get("code")) == ("error", "cancelled")
    # its log lines have their time, as the HTTP server's (they had none: found by review)
    [stopped] = [
        line
        for line in (tmp_path / "stdio.log").read_text().splitlines()
        if "stopped by signal" in line
    ]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO mcp_zero.stdio: ", stopped)


def test_what_a_terminal_acts_on_in_a_plugins_stderr_reaches_the_log_escaped(
    tmp_path: Path,
) -> None:
    # A plugin's stderr lines went to the server's log as written: ESC sequences set the
    # operator's clipboard (OSC 52) or cleared the screen, \r hid a line's start (found by
    # review). They are shown escaped; the line is still there, whole.
    code = (
        "import sys\n"
        "from mcp_zero.plugin import Plugin\n"
        "plugin = Plugin('loud')\n"
        "@plugin.tool('loud_say')\n"
        "async def say(ctx):\n"
        "    print('\\x1b]52;c;cm0gLXJmIH4=\\x07pasted\\x1b[2J\\rhidden\\x85', file=sys.stderr,"
        " flush=True)\n"
        "    return 'said'\n"
    )
    data_dir = str(tmp_path / "data")
    mcp0(
        "plugin",
        "install",
        str(write_plugin(tmp_path / "loud", "loud", code, ["loud_say"])),
        "--data-dir",
        data_dir,
    )
    mcp0("agent", "create", "talker", "--plugin", "loud", "--data-dir", data_dir)
    call = {"id": 2, "method": "tools/call", "params": {"name": "loud_say", "arguments": {}}}
    done = subprocess.run(
        [MCP0, "serve", "--stdio", "--agent", "talker", "--data-dir", data_dir],
        input=_stdio_session(call),
        capture_output=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert answers[-1]["result"]["content"][0]["text"] == "said"
    log = done.stderr.decode()
    [said] = [line for line in log.splitlines() if "pasted" in line]
    assert said.endswith(
        r"mcp_zero.sandbox.plugin.loud: \x1b]52;c;cm0gLXJmIH4=\x07pasted\x1b[2J\rhidden\x85"
    ), said
    assert not set(log) & {"\x1b", "\x07", "\r", "\x85"}


def test_terminating_the_agent_of_a_stdio_session_stops_its_running_call_and_ends_it(
    tmp_path: Path,
) -> None:
    # Only its next request was refused: the running call went on and was audited allowed
    # after the termination's record (found by review). And the session stayed open, closed
    # for good: once the agent was recovered, it served calls without subscriptions, notices
    # or questions to the client (found by review). It ends, as the end of stdin ends it.
    proc, data_dir = _napping_stdio(tmp_path)
    with proc:
        assert proc.stdout is not None
        mcp0("agent", "terminate", "napper", "--data-dir", data_dir)
        ready, _, _ = select.select([proc.stdout], [], [], CLI_TIMEOUT_S)
        assert ready, "no answer to the call after its agent was terminated"
        answer = json.loads(proc.stdout.readline())
        assert proc.wait(timeout=CLI_TIMEOUT_S) == 0  # stdin still open
        assert proc.stdout.read() == b""
    assert answer["id"] == 2
    assert answer["error"]["code"] == -32001, answer
    nap = _the_nap(data_dir)
    assert (nap["outcome"], nap.get("code")) == ("error", "cancelled")
    log = (tmp_path / "stdio.log").read_text()
    assert "agent 'napper' was terminated: ending this session" in log


@pytest.mark.parametrize("ending", ["terminate", "close stdout"])
def test_requests_a_stdio_session_read_from_a_file_and_queued_are_answered_and_recorded_at_its_end(
    tmp_path: Path, ending: str
) -> None:
    # Requests read from a file wait their turn while the agent's slots are all taken: when
    # the session ended (its agent terminated, or its client gone) they were dropped, with no
    # answer and no audit record of what was asked (found by review). Each is answered
    # -32001 now (if stdout is still read), and a governed one recorded as cancelled. So are
    # those read past the queue's bound into the reader's buffer: they went on to run once
    # the running ones ended, their answers going nowhere (found by review).
    data_dir = str(tmp_path / "data")
    mcp0("plugin", "install", str(KIT_DIR), "--data-dir", data_dir)
    mcp0("agent", "create", "napper", "--plugin", "kit", "--data-dir", data_dir)
    requests = tmp_path / "requests.jsonl"
    nap = {"name": "slow_async", "arguments": {"seconds": 4.5}}  # (its timeout: 5 s)
    quick = {"name": "slow_async", "arguments": {"seconds": 0}}
    last = 3 + MAX_QUEUED + 96  # 1,000 queued (the bound), and 96 behind them
    requests.write_bytes(
        _stdio_session(
            *({"id": n, "method": "tools/call", "params": nap} for n in (2, 3)),
            *({"id": n, "method": "tools/call", "params": quick} for n in range(4, last + 1)),
            {"id": last + 1, "method": "ping"},
        )
    )
    with (
        requests.open("rb") as source,
        subprocess.Popen(
            [MCP0, "serve", "--stdio", "--agent", "napper", "--data-dir", data_dir],
            stdin=source,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "MCP0_MAX_CONCURRENCY": "2"},  # 2 and 3 run, the rest wait
        ) as proc,
    ):
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["id"] == 1
        if ending == "terminate":
            time.sleep(0.5)  # the first two calls under way
            mcp0("agent", "terminate", "napper", "--data-dir", data_dir)
            answers = [json.loads(line) for line in proc.stdout.read().splitlines()]
        else:
            proc.stdout.close()  # heard as the first two calls' answers are written
            answers = []
        assert proc.wait(timeout=CLI_TIMEOUT_S) == 0
    records = _audit(data_dir, limit=10_000)
    naps = {r["request_id"]: r for r in records if r.get("resource") == "slow_async"}
    assert sorted(naps) == list(range(2, last + 1))
    outcomes = {(r["outcome"], r.get("code")) for n, r in naps.items() if n > 3}
    assert outcomes == {("error", "cancelled")}, outcomes
    if ending == "close stdout":
        assert naps[2]["outcome"] == naps[3]["outcome"] == "allowed", naps[2]
        return
    assert sorted(a["id"] for a in answers) == list(range(2, last + 2))
    assert all(a["error"]["code"] == -32001 for a in answers), answers[:3]
    unstarted = {a["error"]["message"] for a in answers if a["id"] > 3}
    assert unstarted == {
        "the session ended (or its agent was terminated) before this request started"
    }, unstarted
    assert naps[2]["code"] == naps[3]["code"] == "cancelled", naps[2]


def test_a_stdio_session_waits_for_its_agents_plugins_not_for_one_that_hangs_loading(
    tmp_path: Path,
) -> None:
    # Every installed plugin was waited for, up to 3 s, before initialize was answered: one
    # the agent does not use, hanging as it loaded, held up every client's launch (found
    # by review). The agent's own are waited for; the others start beside the session.
    data_dir = tmp_path / "data"
    pid_file = data_dir / "plugin-data" / "slow" / "slow.pid"  # (its data dir)
    mcp0("plugin", "install", str(loading_plugin(tmp_path / "slow", pid_file)),
         "--data-dir", str(data_dir))  # fmt: skip
    mcp0("plugin", "install", str(KIT_DIR), "--data-dir", str(data_dir))
    mcp0("agent", "create", "ada", "--plugin", "kit", "--data-dir", str(data_dir))
    echo = {"name": "echo", "arguments": {"text": "hi"}}
    done = subprocess.run(
        [MCP0, "serve", "--stdio", "--agent", "ada", "--data-dir", str(data_dir)],
        input=_stdio_session({"id": 2, "method": "tools/call", "params": echo}),
        capture_output=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [a["id"] for a in answers] == [1, 2]
    assert answers[1]["result"]["content"][0]["text"] == "hi", answers
    assert b"still starting" not in done.stderr, done.stderr.decode()
    if pid_file.exists():  # started beside the session (if it got that far), it ended with it
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)


def test_a_stdio_server_whose_stdin_is_dev_null_ends_as_at_the_end_of_stdin(
    tmp_path: Path,
) -> None:
    # (`docker run` without -i, systemd's StandardInput=null) epoll refuses /dev/null:
    # libuv aborted the process, with a core dump (found by review)
    data_dir = str(tmp_path / "data")
    mcp0("agent", "create", "ada", "--data-dir", data_dir)
    done = subprocess.run(
        [MCP0, "serve", "--stdio", "--agent", "ada", "--data-dir", data_dir],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert (done.returncode, done.stdout) == (0, b""), done.stderr


def test_a_stdio_server_on_a_terminal_leaves_it_blocking(tmp_path: Path) -> None:
    # stdin's transport made it non-blocking, and a terminal's is the shell's too: the next
    # program to read it got EAGAIN (found by review)
    data_dir = str(tmp_path / "data")
    mcp0("agent", "create", "ada", "--data-dir", data_dir)
    controller, terminal = os.openpty()
    try:
        with subprocess.Popen(
            [MCP0, "serve", "--stdio", "--agent", "ada", "--data-dir", data_dir],
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        ) as proc:
            assert proc.stdout is not None
            os.write(controller, b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n')
            assert json.loads(proc.stdout.readline()) == {"jsonrpc": "2.0", "id": 1, "result": {}}
            assert not os.get_blocking(terminal)  # (the session's, while it runs)
            os.write(controller, b"\x04")  # the end of input, at a line's start
            assert proc.wait(timeout=CLI_TIMEOUT_S) == 0
        assert os.get_blocking(terminal)
    finally:
        os.close(controller)
        os.close(terminal)


def test_rotating_the_token_a_stdio_session_was_opened_with_ends_it(tmp_path: Path) -> None:
    # It went on serving the rotated token's client: every request was looked up by the
    # agent's name (found by review)
    proc, data_dir = _napping_stdio(tmp_path, with_token=True)
    with proc:
        assert proc.stdout is not None
        assert proc.stdin is not None
        mcp0("agent", "rotate-token", "napper", "--data-dir", data_dir)
        ready, _, _ = select.select([proc.stdout], [], [], CLI_TIMEOUT_S)
        assert ready, "no answer to the call after the session's token was rotated"
        cut = json.loads(proc.stdout.readline())
        proc.stdin.write(b'{"jsonrpc":"2.0","id":3,"method":"tools/list"}\n')
        proc.stdin.flush()
        later = json.loads(proc.stdout.readline())
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    assert cut["id"] == 2
    assert cut["error"]["code"] == -32001, cut
    assert later["id"] == 3
    assert "has a new token" in later["error"]["message"], later
    nap = _the_nap(data_dir)
    assert (nap["outcome"], nap.get("code")) == ("error", "cancelled")
    log = (tmp_path / "stdio.log").read_text()
    assert "agent 'napper' has a new token (the one this was opened with was rotated)" in log


def waiting_plugin(directory: Path) -> Path:
    """Plugin ``waiter``, whose tool ``wait`` touches ``started`` in its data dir, then
    waits an hour (cancellable)."""
    directory.mkdir()
    (directory / "waiter.py").write_text(
        "import asyncio\n"
        "from mcp_zero.plugin import Plugin\n"
        "plugin = Plugin('waiter')\n"
        "@plugin.tool('wait')\n"
        "async def wait(ctx) -> str:\n"
        "    (ctx.data_dir / 'started').touch()\n"
        "    await asyncio.sleep(3600)\n"
        "    return 'waited'\n"
    )
    manifest = {
        "name": "waiter",
        "version": "1.0.0",
        "abi": 1,
        "entry": "waiter:plugin",
        "tools": [{"name": "wait", "description": "wait", "inputSchema": {"type": "object"}}],
    }
    (directory / "plugin.json").write_text(json.dumps(manifest))
    return directory


def test_terminating_the_agent_of_agent_exec_stops_its_call(tmp_path: Path) -> None:
    # `mcp0 agent exec` ran on to its end, printed the result and exited 0, and the call was
    # audited allowed after the termination's record (found by review)
    data_dir = str(tmp_path / "data")
    mcp0("plugin", "install", str(waiting_plugin(tmp_path / "waiter")), "--data-dir", data_dir)
    mcp0("agent", "create", "ada", "--plugin", "waiter", "--data-dir", data_dir)
    started = tmp_path / "data" / "plugin-data" / "waiter" / "started"
    with subprocess.Popen(
        [MCP0, "agent", "exec", "ada", "wait", "--data-dir", data_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while not started.exists():  # the call under way
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        mcp0("agent", "terminate", "ada", "--data-dir", data_dir)
        out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 1
    assert (out, err) == (
        "",
        "mcp0: error: agent 'ada' was terminated while the call ran; it was stopped\n",
    )
    records = [r for r in _audit(data_dir) if r["resource"] == "ada" or r["agent"] == "ada"]
    ends = [(r["verb"], r["outcome"], r.get("code")) for r in records[-2:]]
    assert ends == [("terminate_agent", "allowed", None), ("call_tool", "error", "cancelled")]


def _audit(data_dir: str, limit: int = 100) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = json.loads(
        mcp0(
            "audit", "list", "--after", "0", "--limit", str(limit), "--data-dir", data_dir, "--json"
        )
    )
    return records
