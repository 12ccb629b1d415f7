"""A whole `mcp0 serve` run by an unprivileged user, as most users run it (a developer's own
account, Claude Desktop launching `mcp0 serve --stdio`): first start, a governed call, a plugin
installed with the CLI, and what that plugin's worker can reach.

The tests run as root (CI does); the server runs as ``nobody``. This venv's interpreter may
sit below a directory ``nobody`` may not search (here ``/root``, ``0700``): the server runs in
a mount namespace of its own where each such directory is covered by an open ``tmpfs`` with
just the interpreter, the venv and the package bound back in, so that nothing on the host
changes. The server's workers then build their own confinement as any non-root server's do:
in a user namespace mapped to themselves.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest

import mcp_zero
from mcp_zero.sandbox.isolation import landlock_abi, unsearchable
from requires import require, require_root

MCP0 = str(Path(sys.executable).parent / "mcp0")
KIT_DIR = Path(__file__).parent / "sandbox" / "kit"
START_TIMEOUT_S = 30.0
PROTOCOL = "2025-11-25"

pytestmark = pytest.mark.slow


def _reachable_as(uid: int, gid: int, stage: Path, argv: list[str]) -> list[str]:
    """``argv`` run as ``uid``/``gid`` in a mount namespace of its own where this venv, its
    interpreter and the ``mcp_zero`` package are reachable to that user."""
    needed = sorted(
        {
            os.path.realpath(p)
            for p in (
                os.path.dirname(os.path.realpath(sys.executable)),
                sys.prefix,
                sys.base_prefix,
                os.path.dirname(os.path.dirname(mcp_zero.__file__)),
            )
        }
    )
    every = unsearchable(needed, uid, gid)
    blocked = [b for b in every if not any(b != o and b.startswith(o + "/") for o in every)]
    kept = [p for p in needed if any(p.startswith(b + "/") for b in blocked)]
    script = ["set -e"]
    for i, path in enumerate(kept):  # held at a staging point while the covers go on
        script += [f"mkdir -p {stage}/{i}", f"mount --rbind {shlex.quote(path)} {stage}/{i}"]
    script += [f"mount -t tmpfs -o mode=0755,size=1m tmpfs {shlex.quote(b)}" for b in blocked]
    for i, path in enumerate(kept):
        script += [
            f"mkdir -p {shlex.quote(path)}",
            f"mount --rbind {stage}/{i} {shlex.quote(path)}",
        ]
    script.append(f'exec setpriv --reuid={uid} --regid={gid} --clear-groups -- "$@"')
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "\n".join(script),
        "sh",
        *argv,
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Unprivileged:
    """A `mcp0 serve` of ``user`` on a data dir that user owns."""

    root: Path  # the user's, 0755
    uid: int
    gid: int
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """A command as the user (the CLI), in a mount view where it reaches this venv."""
        argv = _reachable_as(self.uid, self.gid, self.root / "stage", list(args))
        env = {**os.environ, "HOME": str(self.root)}
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)

    def mcp0(self, *args: str) -> str:
        done = self.run(MCP0, *args, "--data-dir", str(self.data_dir))
        assert done.returncode == 0, f"mcp0 {' '.join(args)}: {done.stderr}"
        return done.stdout

    def start(self) -> str:
        """Start the server; its first start's output (the agent token is in it)."""
        argv = _reachable_as(
            self.uid,
            self.gid,
            self.root / "stage",
            [MCP0, "serve", "--data-dir", str(self.data_dir), "--port", str(self.port)],
        )
        log = self.root / "serve.log"
        with log.open("ab") as sink:
            env = {**os.environ, "HOME": str(self.root)}
            self.proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text()
            try:
                if httpx2.get(f"http://127.0.0.1:{self.port}/readyz").status_code == 200:
                    return log.read_text()
            except httpx2.TransportError:
                pass
            time.sleep(0.05)
        pytest.fail(f"mcp0 serve not ready:\n{log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)

    def call(self, token: str, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": tool, "arguments": arguments},
        }
        headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": PROTOCOL,
        }
        answer = httpx2.post(
            f"http://127.0.0.1:{self.port}/mcp", json=body, headers=headers, timeout=30
        )
        assert answer.status_code == 200, answer.text
        assert "result" in answer.json(), answer.text
        result: dict[str, Any] = answer.json()["result"]
        assert not result.get("isError"), result
        return result

    def admin(self, path: str) -> Any:
        token = (self.data_dir / "admin.token").read_text().strip()
        answer = httpx2.get(
            f"http://127.0.0.1:{self.port}/api/v1/{path}",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert answer.status_code == 200, answer.text
        return answer.json()


@pytest.fixture
def nobody() -> Iterator[Unprivileged]:
    require_root("unshare", "setpriv", "mount")
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        require(False, "it needs the user nobody")
        raise
    # Not under pytest's tmp_path: its parents are 0700
    root = Path(tempfile.mkdtemp(prefix="mcp0-unprivileged-"))
    root.chmod(0o755)
    os.chown(root, user.pw_uid, user.pw_gid)  # where the user makes its data dir
    server = Unprivileged(root, user.pw_uid, user.pw_gid, free_port())
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_an_unprivileged_users_server_serves_governed_calls_from_confined_workers(nobody):
    first = nobody.start()
    token = next(line.strip() for line in first.splitlines() if line.strip().startswith("mcp0_"))
    # The data dir is the user's, and its secrets are the user's alone
    assert nobody.data_dir.stat().st_uid == nobody.uid
    admin_token = nobody.data_dir / "admin.token"
    assert (admin_token.stat().st_uid, stat.S_IMODE(admin_token.stat().st_mode)) == (
        nobody.uid,
        0o600,
    )
    added = nobody.call(token, "notes_add", {"text": "buy milk", "tags": ["home"]})
    assert added["structuredContent"]["note"]["text"] == "buy milk"
    found = nobody.call(token, "notes_search", {"query": "milk"})
    assert [n["text"] for n in found["structuredContent"]["notes"]] == ["buy milk"]

    # A plugin installed by the user with the CLI, while the server runs
    source = nobody.root / "kit"
    shutil.copytree(KIT_DIR, source, ignore=shutil.ignore_patterns("__pycache__"))
    nobody.mcp0("plugin", "install", str(source))
    created = json.loads(nobody.mcp0("agent", "create", "prober", "--plugin", "kit", "--json"))
    assert nobody.proc is not None
    server_pid = nobody.proc.pid  # (unshare, sh and setpriv each exec the next)
    probe = {
        "read": [str(admin_token), str(nobody.root / "serve.log"), "/etc/passwd"],
        "write": [str(nobody.root / "planted.txt")],
        "chmod": [str(admin_token)],
        "signal": [server_pid],
    }
    reached = _eventually(lambda: nobody.call(created["token"], "reach", probe))[
        "structuredContent"
    ]

    plugins = {p["name"]: p for p in nobody.admin("plugins")}
    confined = plugins["kit"]["sandbox"]
    assert plugins["notes"]["sandbox"] == confined
    # Its own namespaces, built in a user namespace mapped to itself; it keeps the host's
    # /proc (mounting one needs a PID namespace of its own), so processes are not hidden
    assert confined["unprivileged"] is True
    assert confined["network_isolated"] is True
    assert confined["mounts_confined"] is True
    assert confined["syscalls_restricted"] is True
    assert confined["files_confined"] is (landlock_abi() >= 1)
    assert confined["processes_hidden"] is False
    # The server's files are covered; elsewhere, everything is read-only to it
    assert reached[f"read {admin_token}"] == "FileNotFoundError"
    assert reached[f"chmod {admin_token}"] == "ENOENT"
    assert stat.S_IMODE(admin_token.stat().st_mode) == 0o600
    assert reached["read /etc/passwd"] == "ok"
    assert reached[f"write {nobody.root / 'planted.txt'}"] != "ok"
    assert not (nobody.root / "planted.txt").exists()
    if landlock_abi() >= 1:
        assert reached[f"read {nobody.root / 'serve.log'}"] == "PermissionError"
    # The server, of the worker's own user, is out of its reach (its seccomp filter)
    assert reached[f"signal {server_pid}"] == "PermissionError"
    assert nobody.proc.poll() is None  # (and the server is still there)


def _eventually(call: Any, within: float = 20.0) -> Any:
    """``call()``, again until it stops failing (a plugin installed by the CLI is picked up by
    the running server within a few seconds)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return call()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
