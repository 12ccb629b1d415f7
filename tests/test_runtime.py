"""The runtime on a data dir: first-start layout, and plugin installs as governed actions."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import select
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mcp_zero.audit.chain import GENESIS
from mcp_zero.config import Settings, load_settings
from mcp_zero.errors import ManifestError, PolicyDenied, StorageError
from mcp_zero.kernel.action import Outcome
from mcp_zero.kernel.admin import CHANGE_ADMIN_TOKEN, LOAD_POLICIES, admin_event
from mcp_zero.kernel.admin_token import (
    ADMIN_TOKEN_RECORDED,
    MAX_READ_BACK,
    READ_BACK_PAGE,
    _holds_record,
    recorded_token_digest,
    rotate_admin_token,
    rotation_id,
)
from mcp_zero.kernel.agents import state_digest
from mcp_zero.policy import write_default_policies
from mcp_zero.runtime import Runtime
from mcp_zero.security.files import exclusive_lock
from mcp_zero.security.tokens import hash_token, new_token, write_secret_file
from mcp_zero.storage.base import AuditEntry
from mcp_zero.storage.sqlite import SqliteStore
from plugin_builders import loading_plugin

NOTES_DIR = Path(__file__).parents[1] / "src" / "mcp_zero" / "examples" / "plugins" / "notes"
MCP0 = str(Path(sys.executable).parent / "mcp0")


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    rt = Runtime(load_settings(None, {"data_dir": tmp_path / "data"}, environ={}))
    yield rt
    rt.close()


def test_first_start_lays_out_the_data_dir_with_private_secrets(runtime: Runtime) -> None:
    s = runtime.settings
    assert runtime.created
    assert s.db_path.exists()
    assert (s.policy_dir / "default.cedar").exists()
    for secret in (s.admin_token_path, s.keys_dir / "signing.key"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert runtime.admin_token().startswith("mcp0_")


def test_secret_files_a_restore_left_open_to_others_are_made_private_saying_so(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    # VACUUM INTO writes the database 0644 under the usual umask, and a token written
    # by hand takes it too: they were served as they were, without a word (found by review)
    s = runtime.settings
    runtime.close()
    secrets = [s.db_path, s.admin_token_path, s.keys_dir / "signing.key"]
    for secret in secrets:
        secret.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="mcp_zero"):
        reopened = Runtime(s)
    try:
        # its -wal and -shm, which SQLite makes with the database's mode: private too
        made = sorted(p.name for p in s.data_dir.glob("mcp0.db-*"))
        assert made == ["mcp0.db-shm", "mcp0.db-wal"]
        for secret in [*secrets, *s.data_dir.glob("mcp0.db-*")]:
            assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    finally:
        reopened.close()
    for secret in secrets:
        assert f"{secret} was mode 0644, open to others: made 0600" in caplog.text
    assert "replace it: mcp0 admin rotate-token" in caplog.text  # (the token's)
    # what it gave its owner is kept, and said: 0444 became 0400, said "made 0600" (review)
    s.keys_dir.joinpath("signing.key").chmod(0o444)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mcp_zero"):
        Runtime(s).close()
    assert stat.S_IMODE(s.keys_dir.joinpath("signing.key").stat().st_mode) == 0o400
    assert "signing.key was mode 0444, open to others: made 0400" in caplog.text


def test_a_data_dir_mcp0_creates_is_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "data"
    Runtime(load_settings(None, {"data_dir": data_dir}, environ={})).close()
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700


def test_an_existing_data_dir_keeps_its_mode(tmp_path: Path) -> None:
    # --data-dir /tmp (or a directory shared with others) had its mode clobbered to 0700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    for _ in range(2):  # a first start and a later one
        Runtime(load_settings(None, {"data_dir": shared}, environ={})).close()
        assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert stat.S_IMODE((shared / "admin.token").stat().st_mode) == 0o600
    assert stat.S_IMODE((shared / "keys" / "signing.key").stat().st_mode) == 0o600


def test_a_damaged_record_is_no_record_of_a_rotation() -> None:
    # a record holding the rotation's id whose body is not JSON made the search for the
    # rotation's record, and the runtime's start, fail with a bare JSONDecodeError (found by
    # a bug hunt): it is passed over, as any record of something else
    rotation = rotation_id("mcp0_admin_token")
    damaged = AuditEntry(1, 0.0, b'{"rotation": "' + rotation.encode() + b'", damaged', "", "")
    recorded = {"verb": "change_admin_token", "rotation": rotation}
    whole = AuditEntry(2, 0.0, orjson.dumps(recorded), "", "")
    assert not _holds_record([damaged], rotation)
    assert _holds_record([damaged, whole], rotation)


def test_a_removed_admin_token_stays_removed_until_a_rotation(tmp_path: Path) -> None:
    # Removing it closes the admin API, but the next command (or restart) silently wrote a
    # new one, which a running server took up a second later (found by review)
    settings = load_settings(None, {"data_dir": tmp_path / "data"}, environ={})
    Runtime(settings).close()  # a new data dir gets a token
    settings.admin_token_path.unlink()
    for _ in range(2):  # a restart, another command
        runtime = Runtime(settings)
        runtime.record_what_governs(by="mcp0 agent attach")
        runtime.close()
        assert runtime.admin_token_hash is None
        assert not settings.admin_token_path.exists()
    runtime = Runtime(settings)
    try:
        rotate_admin_token(settings.admin_token_path, runtime.audit, runtime.store)
        assert runtime.refresh_admin_token()
        assert runtime.admin_token_hash == hash_token(runtime.admin_token())
        closed = [
            (b["outcome"], b.get("code"))
            for b in (orjson.loads(e.body) for e in runtime.store.read_audit(0, 1000))
            if b["verb"] == CHANGE_ADMIN_TOKEN
        ]
    finally:
        runtime.close()
    assert closed == [("error", "no_admin_token"), ("allowed", None)]  # (once, then rotated)


def test_the_first_start_makes_the_signing_key_without_loading_cryptography(
    tmp_path: Path,
) -> None:
    # cryptography would stay resident in the server, ~10 MiB for a key it does not use yet
    probe = (
        "import sys; from mcp_zero.config import load_settings; from mcp_zero.runtime import"
        " Runtime; rt = Runtime(load_settings(None, {'data_dir': sys.argv[1]}, environ={}));"
        " rt.close(); print(rt.created, 'cryptography' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split() == ["True", "False"]
    key = serialization.load_pem_private_key(
        (tmp_path / "data" / "keys" / "signing.key").read_bytes(), password=None
    )
    assert isinstance(key, Ed25519PrivateKey)
    public = (tmp_path / "data" / "keys" / "signing.pub").read_bytes()
    assert public == key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_plugin_install_and_remove_are_audited(runtime: Runtime) -> None:
    manifest = runtime.install_plugin(NOTES_DIR).manifest
    assert runtime.store.get_plugin(manifest.name) is not None
    runtime.remove_plugin(manifest.name)
    assert runtime.store.get_plugin(manifest.name) is None
    verbs = [orjson.loads(e.body) for e in runtime.store.read_audit(0, 100)]
    assert [(v["verb"], v["resource"], v["outcome"]) for v in verbs] == [
        ("install_plugin", "notes", "allowed"),
        ("remove_plugin", "notes", "allowed"),
    ]


def test_a_restart_does_not_bring_back_a_default_policy_the_admin_removed(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    settings = runtime.settings
    (settings.policy_dir / "default.cedar").unlink()  # "deny everything"
    runtime.close()
    again = Runtime(settings)
    try:
        assert not again.created
        assert list(settings.policy_dir.iterdir()) == []
        assert "every action is denied" in caplog.text
        with pytest.raises(PolicyDenied):
            again.install_plugin(NOTES_DIR)  # the admin's actions too
    finally:
        again.close()


def test_a_policy_can_forbid_installing_a_plugin(runtime: Runtime) -> None:
    (runtime.settings.policy_dir / "frozen.cedar").write_text(
        '@id("frozen-plugins")\n'
        '@reason("the plugin set is frozen")\n'
        'forbid (principal, action == Action::"install_plugin", resource);\n'
    )
    runtime.policy.reload()
    with pytest.raises(PolicyDenied, match="frozen-plugins"):
        runtime.install_plugin(NOTES_DIR)
    assert runtime.store.get_plugin("notes") is None
    [record] = [orjson.loads(e.body) for e in runtime.store.read_audit(0, 100)]
    assert record["outcome"] == "denied"
    assert record["policies"] == ["frozen-plugins"]


@pytest.mark.anyio
async def test_changed_policy_files_are_put_in_force_or_refused_and_audited(
    runtime: Runtime,
) -> None:
    def records() -> list[dict[str, Any]]:
        bodies = [orjson.loads(e.body) for e in runtime.store.read_audit(0, 100)]
        return [b for b in bodies if b["verb"] == "load_policies"]

    assert not await runtime.refresh_policies()  # nothing changed since the start
    frozen = runtime.settings.policy_dir / "frozen.cedar"
    frozen.write_text(
        '@id("frozen")\nforbid (principal, action == Action::"install_plugin", resource);\n'
    )
    assert not await runtime.refresh_policies()  # seen once: it may be half-written
    assert await runtime.refresh_policies()  # read the same again: put in force
    assert "frozen" in runtime.policy.engine.policies
    [loaded] = records()
    assert loaded["outcome"] == "allowed"
    assert loaded["transport"] == "files"
    assert loaded["policies_sha256"] == runtime.policy.engine.digest
    assert loaded["generation"] == 2

    frozen.write_text("forbid (principal, action, resource")  # does not parse
    assert not await runtime.refresh_policies()
    assert not await runtime.refresh_policies()  # tried: refused
    assert not await runtime.refresh_policies()  # the same broken files: not tried again
    assert "frozen" in runtime.policy.engine.policies  # the previous set stays in force
    [_, refused] = records()
    assert refused["outcome"] == "error"
    assert refused["code"] == "policy_invalid"
    assert refused["message"].startswith("frozen.cedar:1: cannot parse policy")

    frozen.unlink()
    assert not await runtime.refresh_policies()
    assert await runtime.refresh_policies()
    assert "frozen" not in runtime.policy.engine.policies
    assert [r["outcome"] for r in records()] == ["allowed", "error", "allowed"]

    # a directory that cannot be read is one error too, not one a second
    policy_dir = runtime.settings.policy_dir
    policy_dir.rename(policy_dir.with_name("moved"))
    assert not await runtime.refresh_policies()
    assert not await runtime.refresh_policies()
    assert [r["outcome"] for r in records()][-1] == "error"
    assert len(records()) == 4
    policy_dir.with_name("moved").rename(policy_dir)
    assert not await runtime.refresh_policies()  # the set in force again: nothing to load
    assert len(records()) == 4


def serve_once(data_dir: Path) -> dict[str, Any]:
    """Start ``mcp0 serve --port 0 --json``, read what it announces, stop it (SIGTERM)."""
    proc = subprocess.Popen(
        [MCP0, "serve", "--port", "0", "--json", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while not select.select([proc.stdout], [], [], 0.1)[0]:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "mcp0 serve announced nothing in 30 s"
        announced: dict[str, Any] = json.loads(proc.stdout.readline())
        return announced
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def first_start_killed_at(module: str, function: str, data_dir: Path) -> None:
    """Run a first ``mcp0 serve`` on ``data_dir`` in a child that is SIGKILLed when it
    calls ``function`` of ``module`` (``Class.method`` or a module function)."""
    owner, _, name = function.rpartition(".")
    target = f"{module}.{owner}" if owner else module
    dies_there = (
        "import importlib, os, signal, sys\n"
        f"where = importlib.import_module({module!r})\n"
        + (f"where = getattr(where, {owner!r})\n" if owner else "")
        + f"setattr(where, {name!r}, lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL))\n"
        "from mcp_zero.cli.main import main\n"
        "sys.argv = ['mcp0', *sys.argv[1:]]\n"
        "main()\n"
    )
    serve = ["serve", "--port", "0", "--data-dir", str(data_dir)]
    killed = subprocess.run(
        [sys.executable, "-c", dies_there, *serve], capture_output=True, timeout=60
    )
    assert killed.returncode == -signal.SIGKILL, (target, killed.stderr)


def test_a_first_start_killed_midway_is_finished_by_the_next_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    # the first start dies (kill -9, a full disk) once the database exists, before the examples
    first_start_killed_at("mcp_zero.runtime", "Runtime.install_examples", data_dir)
    assert (data_dir / "mcp0.db").exists()
    # it silently came up with no example plugin, no default agent and no token
    finished = serve_once(data_dir)
    assert finished["plugins_installed"] == ["notes"]
    assert finished["agent"]["name"] == "default"
    assert finished["agent"]["token"].startswith("mcp0_")
    again = serve_once(data_dir)  # done once: never again
    assert again["plugins_installed"] == []
    assert "agent" not in again
    assert again["admin_api_open"] is True
    (data_dir / "admin.token").unlink()  # closed: and a script can tell (found by review)
    assert serve_once(data_dir)["admin_api_open"] is False


def test_a_first_start_killed_before_showing_the_token_gives_default_a_new_one(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    # the first start dies once agent default exists, before its token is shown (its
    # plugins starting, the listen)
    first_start_killed_at("mcp_zero.cli.serve", "_end_left_behind", data_dir)
    with SqliteStore(data_dir / "mcp0.db", read_only=True) as store:
        [made] = store.list_agents()
    assert made.name == "default"
    # the next start said nothing of it: default's token was never shown, by either start
    finished = serve_once(data_dir)
    assert finished["agent"]["name"] == "default"
    assert finished["agent"]["reissued"] is True
    token = finished["agent"]["token"]
    with SqliteStore(data_dir / "mcp0.db", read_only=True) as store:
        assert store.get_agent("default").token_hash == hash_token(token)  # type: ignore[union-attr]
        records = [orjson.loads(e.body) for e in store.read_audit(0, 1000)]
    reissued = [r for r in records if r["verb"] == "spawn_agent"][-1]
    assert (reissued["verb"], reissued["resource"]) == ("spawn_agent", "default")
    assert reissued["token_reissued"] is True
    assert reissued["state_sha256"] == state_digest({})  # (as every spawn record has)
    again = serve_once(data_dir)  # done once: never again
    assert "agent" not in again


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_policy_change_the_audit_log_cannot_record_is_not_put_in_force(
    runtime: Runtime,
) -> None:
    # The new set went into force before its record was written: with the log failing (a
    # full disk), calls were decided by a set no record announced (found by review)
    frozen = runtime.settings.policy_dir / "frozen.cedar"
    frozen.write_text(
        '@id("frozen")\nforbid (principal, action == Action::"install_plugin", resource);\n'
    )
    assert not await runtime.refresh_policies()  # seen once
    writer = sqlite3.connect(runtime.settings.db_path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # past the store's busy timeout: the record fails
        assert not await runtime.refresh_policies()
    finally:
        writer.close()
    assert "frozen" not in runtime.policy.engine.policies
    assert runtime.policy.generation == 1
    assert not await runtime.refresh_policies()  # the files still differ: loaded again
    assert await runtime.refresh_policies()
    assert "frozen" in runtime.policy.engine.policies
    bodies = [orjson.loads(e.body) for e in runtime.store.read_audit(0, 100)]
    [loaded] = [b for b in bodies if b["verb"] == "load_policies"]
    assert (loaded["outcome"], loaded["generation"]) == ("allowed", 2)
    assert loaded["policies_sha256"] == runtime.policy.engine.digest


def test_a_restart_needs_no_write_while_another_process_holds_the_store(tmp_path: Path) -> None:
    # Every start recorded the first start done again, after listening: with a CLI command
    # (or any writer) holding the store's lock past the busy timeout, a restart exited with
    # "database is locked".
    data_dir = tmp_path / "data"
    serve_once(data_dir)  # the first start
    writer = sqlite3.connect(data_dir / "mcp0.db", isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # held through the whole restart
        announced = serve_once(data_dir)
    finally:
        writer.close()
    assert announced["url"].startswith("http://127.0.0.1:")
    assert "agent" not in announced


def test_a_data_dir_laid_out_by_another_command_gets_no_examples_from_serve(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    created = subprocess.run(
        [MCP0, "agent", "create", "ada", "--data-dir", str(data_dir)],
        capture_output=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    announced = serve_once(data_dir)
    assert announced["plugins_installed"] == []
    assert "agent" not in announced


async def _until(check: Any, what: str) -> None:
    """Wait (bounded) until ``check()`` is true; the watcher looks once a second."""
    with anyio.move_on_after(30):
        while not check():
            await anyio.sleep(0.05)
        return
    raise AssertionError(f"waited 30 s for {what}")


@pytest.mark.anyio
async def test_policies_and_admin_token_changed_while_no_server_ran_are_recorded_at_start(
    tmp_path: Path,
) -> None:
    # Changed while the server was stopped (or just before a kill -9), they were put in
    # force at start with no record: calls were decided by a set the log never announced,
    # the admin API taken by a token it never saw (found by review)
    data_dir = tmp_path / "data"

    def governing(runtime: Runtime) -> list[dict[str, Any]]:
        bodies = [orjson.loads(e.body) for e in runtime.store.read_audit(0, 100_000)]
        return [b for b in bodies if b["verb"] in (LOAD_POLICIES, CHANGE_ADMIN_TOKEN)]

    async with started(data_dir) as runtime:
        first = governing(runtime)  # what it started with, as the log first sees it
        assert [(b["verb"], b["at_start"]) for b in first] == [
            (LOAD_POLICIES, True),
            (CHANGE_ADMIN_TOKEN, True),
        ]
        assert first[0]["policies_sha256"] == runtime.policy.engine.digest
    (data_dir / "policies" / "late.cedar").write_text(
        '@id("late")\nforbid (principal, action == Action::"install_plugin", resource);\n'
    )
    (data_dir / "admin.token").write_text("mcp0_written-while-stopped\n")
    async with started(data_dir) as runtime:
        changed = governing(runtime)[2:]
        assert [(b["verb"], b["outcome"], b["at_start"]) for b in changed] == [
            (LOAD_POLICIES, "allowed", True),
            (CHANGE_ADMIN_TOKEN, "allowed", True),
        ]
        assert changed[0]["policies_sha256"] == runtime.policy.engine.digest
        assert "late" in runtime.policy.engine.policies
    async with started(data_dir) as runtime:
        assert len(governing(runtime)) == 4  # nothing changed since: nothing more
    (data_dir / "admin.token").unlink()  # a command records it, and lays out none
    done = subprocess.run(
        [MCP0, "agent", "create", "ada", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    with SqliteStore(data_dir / "mcp0.db", read_only=True) as store:
        bodies = [orjson.loads(e.body) for e in store.read_audit(0, 1000)]
    assert [b["verb"] for b in bodies][-2:] == [CHANGE_ADMIN_TOKEN, "spawn_agent"]
    assert (bodies[-2]["outcome"], bodies[-2]["code"]) == ("error", "no_admin_token")
    assert not (data_dir / "admin.token").exists()
    # found by a command, not a server's start (which it is not: found by review)
    assert "at_start" not in bodies[-2]
    assert bodies[-2]["found_by_command"].endswith("agent create")


@pytest.mark.parametrize("how", ["emptied", "deleted"])
def test_a_data_dir_whose_database_was_lost_is_refused_not_laid_out_anew(
    tmp_path: Path, how: str
) -> None:
    # It was taken for a new data dir: the example installed, agent default made, a fresh
    # chain that verified, the old agents and history gone without a word (found by review)
    data_dir = tmp_path / "data"
    for command in (["plugin", "install", str(NOTES_DIR)], ["agent", "create", "ada"]):
        done = subprocess.run(
            [MCP0, *command, "--data-dir", str(data_dir)], capture_output=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
    db = data_dir / "mcp0.db"
    for stale in data_dir.glob("mcp0.db-*"):
        stale.unlink()
    if how == "emptied":
        db.write_bytes(b"")
    else:
        db.unlink()
    for command in (["serve", "--port", "0"], ["agent", "create", "bob"]):
        done = subprocess.run(
            [MCP0, *command, "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1, command
        assert done.stderr.startswith(f"mcp0: error: the database {db} is ")
        assert "holds copies of installed plugins (notes/" in done.stderr
        assert "Restore mcp0.db" in done.stderr
        assert done.stderr.count("\n") == 1
    assert db.exists() == (how == "emptied")
    assert not db.exists() or db.stat().st_size == 0  # nothing laid out in it


def test_a_copy_of_a_running_data_dir_without_its_wal_is_refused_not_laid_out_anew(
    runtime: Runtime, tmp_path: Path
) -> None:
    # Until the WAL is checkpointed, a running server's mcp0.db is one page without tables:
    # a backup that left out mcp0.db-wal was set up as a new store, and the reading commands
    # advised 'mcp0 serve' to do so (found by review)
    runtime.install_plugin(NOTES_DIR)
    copy = tmp_path / "copy"
    shutil.copytree(runtime.settings.data_dir, copy, ignore=shutil.ignore_patterns("mcp0.db-*"))
    db, installed = copy / "mcp0.db", next((copy / "plugins" / "notes").iterdir()).name
    for command in (["serve", "--port", "0"], ["audit", "verify"]):
        done = subprocess.run(
            [MCP0, *command, "--data-dir", str(copy)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 1, command
        assert done.stderr == (
            f"mcp0: error: the database {db} is without tables (copied without its "
            f"mcp0.db-wal?), but {copy / 'plugins'} holds copies of installed plugins "
            f"(notes/{installed}): the agents, plugins and audit log recorded with them are "
            "gone. Restore mcp0.db (and mcp0.db-wal) if you have a backup; else move the data "
            "dir aside to start anew\n"
        )
    assert sorted(p.name for p in copy.glob("mcp0.db*")) == ["mcp0.db"]  # left as it was
    conn = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)
    try:
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
    finally:
        conn.close()


@pytest.mark.parametrize("how", ["emptied", "deleted", "copied without its wal"])
def test_a_data_dir_without_plugins_whose_database_was_lost_is_refused_too(
    tmp_path: Path, how: str
) -> None:
    # Only installed plugins' copies told a lost database from a new data dir: with none
    # (examples declined, every plugin removed), a database lost, emptied or copied without
    # its WAL was laid out anew, agents and audit history gone, and a fresh chain that
    # verified; the reading commands advised 'mcp0 serve' to do so (found by a bug hunt)
    data_dir = tmp_path / "data"
    runtime = Runtime(load_settings(None, {"data_dir": data_dir}, environ={}))
    try:
        runtime.record_what_governs()
        asyncio.run(runtime.agents.spawn("ada", [], via="cli"))
        copy = tmp_path / "copy"  # (while it runs: what it wrote is in its WAL)
        shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns("mcp0.db-*"))
    finally:
        runtime.close()
    if how != "copied without its wal":
        copy = data_dir
        for stale in data_dir.glob("mcp0.db-*"):
            stale.unlink()
        if how == "emptied":
            (data_dir / "mcp0.db").write_bytes(b"")
        else:
            (data_dir / "mcp0.db").unlink()
    assert not (copy / "plugins").exists() or not any((copy / "plugins").iterdir())
    db = copy / "mcp0.db"
    for command in (["agent", "create", "bob"], ["audit", "verify"], ["agent", "list"]):
        done = subprocess.run(
            [MCP0, *command, "--data-dir", str(copy)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 1, (command, done.stdout)
        assert done.stderr.startswith(f"mcp0: error: the database {db} is "), done.stderr
        assert "the agents, plugins and audit log recorded in it are gone" in done.stderr
        assert "Restore mcp0.db" in done.stderr
        assert done.stderr.count("\n") == 1
    assert sorted(p.name for p in copy.glob("mcp0.db*")) == (
        [] if how == "deleted" else ["mcp0.db"]
    )


def test_a_data_dir_prepared_by_the_operator_is_not_taken_for_a_lost_one(tmp_path: Path) -> None:
    # plugin-data/ on a file system of its own (docs/plugins.md) has its lost+found, and a
    # plugins/.keep is no install: both were refused as a lost database (found by review)
    data_dir = tmp_path / "data"
    (data_dir / "plugin-data" / "lost+found").mkdir(parents=True)
    (data_dir / "plugins").mkdir()
    (data_dir / "plugins" / ".keep").write_text("")
    done = subprocess.run(
        [MCP0, "agent", "create", "bob", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_a_first_start_records_the_policies_it_decides_under_before_deciding(
    tmp_path: Path,
) -> None:
    # The example's install and agent default were decided by the operator's policy set,
    # and the set recorded after them (found by review)
    data_dir = tmp_path / "data"
    (data_dir / "policies").mkdir(parents=True)
    write_default_policies(data_dir / "policies")
    (data_dir / "policies" / "ops.cedar").write_text(
        '@id("ops")\nforbid (principal, action == Action::"call_tool", resource)'
        " when { context.anonymous };\n"
    )
    serve_once(data_dir)
    with SqliteStore(data_dir / "mcp0.db", read_only=True) as store:
        verbs = [orjson.loads(e.body)["verb"] for e in store.read_audit(0, 1000)]
    assert verbs[:2] == [LOAD_POLICIES, CHANGE_ADMIN_TOKEN]
    assert "install_plugin" in verbs[2:]
    assert "spawn_agent" in verbs[2:]


def _admin_token_changes(runtime: Runtime) -> list[dict[str, Any]]:
    """The admin token's changes while the server ran (not the token it started with)."""
    bodies = [orjson.loads(e.body) for e in runtime.store.read_audit(0, 100_000)]
    return [b for b in bodies if b["verb"] == "change_admin_token" and "at_start" not in b]


@asynccontextmanager
async def started(data_dir: Path) -> AsyncIterator[Runtime]:
    """A runtime on ``data_dir`` (no examples), started, closed after."""
    runtime = Runtime(load_settings(None, {"data_dir": data_dir, "examples": False}, environ={}))
    await runtime.start(wait=10)
    try:
        yield runtime
    finally:
        await runtime.aclose()


@pytest.mark.anyio
async def test_a_started_runtime_checkpoints_its_wal_so_a_copy_of_mcp0_db_alone_holds_the_store(
    tmp_path: Path,
) -> None:
    # mcp0.db stayed one page without tables until ~4 MB of WAL: a backup of it alone, a
    # common mistake, held nothing (found by review)
    async with started(tmp_path / "data") as runtime:
        checkpointed, loop = asyncio.Event(), asyncio.get_running_loop()
        checkpoint = runtime.store.checkpoint

        def checkpoint_and_tell() -> None:  # (on a thread of the loop's)
            checkpoint()
            loop.call_soon_threadsafe(checkpointed.set)

        runtime.store.checkpoint = checkpoint_and_tell  # type: ignore[method-assign]
        with anyio.fail_after(5):
            await checkpointed.wait()  # the watcher's first round
        head = runtime.store.audit_head()
        copy = tmp_path / "copy.db"
        copy.write_bytes(runtime.settings.db_path.read_bytes())
    assert head is not None
    with SqliteStore(copy, read_only=True) as copied:
        assert copied.audit_head() == head


@pytest.mark.anyio
async def test_an_admin_token_file_that_is_not_utf8_closes_the_admin_api_and_the_watcher_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    async with started(data_dir) as runtime:
        path = runtime.settings.admin_token_path
        path.write_bytes(b"mcp0_\xff\xfe-garbled\n")
        # it killed the watcher (UnicodeDecodeError): nothing after was ever taken up
        await _until(lambda: runtime.admin_token_hash is None, "the admin API closed")
        await _until(lambda: len(_admin_token_changes(runtime)) == 1, "the change audited")
        [closed] = _admin_token_changes(runtime)
        assert (closed["outcome"], closed["code"]) == ("error", "no_admin_token")
        in_data_dir = ["--data-dir", str(data_dir)]
        # commands do not die on it with a traceback; rotate-token is the fix
        listed = await anyio.run_process([MCP0, "agent", "list", *in_data_dir], check=False)
        assert listed.returncode == 0, listed.stderr
        rotated = await anyio.run_process(
            [MCP0, "admin", "rotate-token", *in_data_dir], check=False
        )
        assert rotated.returncode == 0, rotated.stderr
        token = path.read_text().strip()
        await _until(lambda: runtime.admin_token_hash == hash_token(token), "the new token")
        installed = await anyio.run_process(
            [MCP0, "plugin", "install", str(NOTES_DIR), *in_data_dir], check=False
        )
        assert installed.returncode == 0, installed.stderr
        await _until(lambda: "notes" in runtime.plugins.manifests, "the new plugin")
    unreadable = [r for r in caplog.records if "cannot read the admin token file" in r.message]
    assert len(unreadable) == 1  # once, with the reason
    assert "utf-8" in unreadable[0].getMessage()


@pytest.mark.anyio
async def test_a_plugin_slow_to_start_holds_up_no_admin_token_change(tmp_path: Path) -> None:
    # The watcher waited for a plugin installed under it to start before it looked at the
    # policies and the admin token: one whose import took 8 s kept a rotated token out of
    # force as long, one that hung for its whole start timeout (found by review)
    data_dir = tmp_path / "data"
    pid_file = data_dir / "plugin-data" / "slow" / "slow.pid"  # (its data dir)
    async with started(data_dir) as runtime:
        runtime.plugins.install(loading_plugin(tmp_path / "slow", pid_file))  # as the CLI
        await _until(pid_file.exists, "the watcher starting the plugin")  # (it hangs loading)
        runtime.settings.admin_token_path.write_text("mcp0_written-while-it-loads\n")
        with anyio.fail_after(5):  # (the watcher looks once a second)
            while runtime.admin_token_hash != hash_token("mcp0_written-while-it-loads"):
                await anyio.sleep(0.05)
        assert "slow" in runtime.plugins.starting


@pytest.mark.anyio
async def test_a_rotation_beside_a_running_server_is_recorded_once_and_a_hand_edit_too(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    async with started(data_dir) as runtime:
        path = runtime.settings.admin_token_path
        rotated = await anyio.run_process(
            [MCP0, "admin", "rotate-token", "--data-dir", str(data_dir)], check=False
        )
        assert rotated.returncode == 0, rotated.stderr
        token = path.read_text().strip()
        await _until(lambda: runtime.admin_token_hash == hash_token(token), "the new token")
        path.write_text("mcp0_written-by-hand\n")  # no rotation explains this one
        await _until(lambda: runtime.admin_token_hash == hash_token("mcp0_written-by-hand"), "it")
        path.write_text("")  # and a last change, to know the watcher is done with the others

        def closed() -> bool:
            return any(c["outcome"] == "error" for c in _admin_token_changes(runtime))

        await _until(closed, "the emptied file audited")
        changes = _admin_token_changes(runtime)
    # the server recorded the rotation again when it noticed it (transport files)
    assert [(c["transport"], c["outcome"]) for c in changes] == [
        ("cli", "allowed"),
        ("files", "allowed"),
        ("files", "error"),
    ]
    assert "rotation" in changes[0]
    assert "rotation" not in changes[1]


def found_by_a_command(settings: Settings) -> None:
    """What governs the data dir as a changing command (mcp0 agent snapshot) finds it: recorded
    by it if it changed."""
    command = Runtime(settings)
    command.record_what_governs(by="mcp0 agent snapshot")
    command.close()


@pytest.mark.anyio
async def test_a_change_a_command_recorded_first_is_not_recorded_again_by_the_server(
    tmp_path: Path,
) -> None:
    # One change of a governing file was audited twice when a command noticed it before the
    # server did: by the command ("found_by_command"), then by the server (found by review)
    settings = load_settings(None, {"data_dir": tmp_path / "data", "examples": False}, environ={})
    server = Runtime(settings)  # (not started: its watcher's steps are taken here)
    try:
        server.record_what_governs()
        (settings.policy_dir / "extra.cedar").write_text(
            '@id("extra")\npermit (principal, action == Action::"call_tool", resource)'
            " when { false };\n"
        )
        settings.admin_token_path.write_text("mcp0_written-by-hand\n")
        found_by_a_command(settings)
        assert not await server.refresh_policies()  # (seen once)
        assert await server.refresh_policies()
        await server._refresh_admin_token_and_audit()
        assert "extra" in server.policy.engine.policies  # taken up all the same
        assert server.admin_token_hash == hash_token("mcp0_written-by-hand")
        bodies = [orjson.loads(e.body) for e in server.store.read_audit(0, 1000)]
    finally:
        await server.aclose()
    recorded = [(b["verb"], b.get("found_by_command")) for b in bodies]
    assert recorded == [
        (LOAD_POLICIES, None),  # (at start)
        (CHANGE_ADMIN_TOKEN, None),
        (LOAD_POLICIES, "mcp0 agent snapshot"),
        (CHANGE_ADMIN_TOKEN, "mcp0 agent snapshot"),
    ]


@pytest.mark.anyio
async def test_a_set_a_command_recorded_and_that_was_changed_back_is_followed_by_the_set_in_force(
    tmp_path: Path,
) -> None:
    # A command recorded a policy set the server never saw (the file was removed again before
    # it looked): the log's last word said it governed, while the server decided under its
    # own (found by review). The server records its set again.
    settings = load_settings(None, {"data_dir": tmp_path / "data", "examples": False}, environ={})
    server = Runtime(settings)  # (not started: its watcher's steps are taken here)
    try:
        server.record_what_governs()
        in_force = server.policy.engine.digest
        extra = settings.policy_dir / "extra.cedar"
        extra.write_text('@id("extra")\npermit (principal, action, resource) when { false };\n')
        found_by_a_command(settings)
        extra.unlink()
        assert not await server.refresh_policies()
        assert not await server.refresh_policies()  # (nothing new the second time)
        bodies = [orjson.loads(e.body) for e in server.store.read_audit(0, 1000)]
    finally:
        await server.aclose()
    loads = [b for b in bodies if b["verb"] == LOAD_POLICIES]
    assert [(b.get("found_by_command"), b.get("restated")) for b in loads] == [
        (None, None),
        ("mcp0 agent snapshot", None),
        (None, True),
    ]
    assert loads[-1]["policies_sha256"] == in_force


class _ReadBackStore(SqliteStore):
    """A store that notes how many entries each read_audit asks for."""

    def __init__(self, path: Path, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.reads: list[int] = []

    def read_audit(self, after_seq: int = 0, limit: int = 1000) -> list[AuditEntry]:
        self.reads.append(limit)
        return super().read_audit(after_seq, limit)


class _ReadBackRuntime(Runtime):
    def _open_store(self) -> _ReadBackStore:
        return _ReadBackStore(self.settings.db_path)


@pytest.mark.anyio
async def test_a_hand_edit_after_a_long_log_is_recorded_once_reading_it_back_a_page_at_a_time(
    tmp_path: Path,
) -> None:
    runtime = _ReadBackRuntime(
        load_settings(None, {"data_dir": tmp_path / "data", "examples": False}, environ={})
    )
    try:
        # another process appends a long log after the server took up its token
        head = runtime.store.audit_head()
        start = head.seq if head is not None else 0
        other = SqliteStore(runtime.settings.db_path)
        body = orjson.dumps({"verb": "call_tool", "agent": "default", "outcome": "allowed"})
        entries, prev = [], head.hash if head is not None else GENESIS
        for seq in range(start + 1, start + MAX_READ_BACK + 20_001):
            digest = hashlib.sha256(bytes.fromhex(prev) + body).hexdigest()
            entries.append(AuditEntry(seq, 1.0, body, prev, digest))
            prev = digest
        other.append_audit_batch(entries)
        other.close()
        assert isinstance(runtime.store, _ReadBackStore)
        runtime.store.reads.clear()
        runtime.settings.admin_token_path.write_text("mcp0_written-by-hand\n")
        await runtime._refresh_admin_token_and_audit()
        reads = list(runtime.store.reads)
    finally:
        await runtime.aclose()
    assert runtime.admin_token_hash == hash_token("mcp0_written-by-hand")
    assert reads
    assert max(reads) <= READ_BACK_PAGE  # memory bounded by a page
    assert sum(reads) <= MAX_READ_BACK
    store = SqliteStore(runtime.settings.db_path)
    try:
        tail = [orjson.loads(e.body) for e in store.read_audit(start + MAX_READ_BACK, 100_000)]
    finally:
        store.close()
    assert [(c["transport"], c["outcome"]) for c in tail if c["verb"] == CHANGE_ADMIN_TOKEN] == [
        ("files", "allowed")
    ]


@pytest.mark.anyio
async def test_a_rotation_between_its_record_and_its_rename_is_not_recorded_again(
    tmp_path: Path,
) -> None:
    settings = load_settings(None, {"data_dir": tmp_path / "data", "examples": False}, environ={})
    server, cli = Runtime(settings), Runtime(settings)
    try:
        path = settings.admin_token_path
        rotate_admin_token(path, cli.audit, cli.store)  # in force, not yet taken up
        # a second rotation, as rotate_admin_token makes it: under the rotation lock, its
        # record committed, its token not yet renamed into place when the server looks
        token = new_token()
        with exclusive_lock(path.parent / ".rotate-token.lock"):
            staged = path.with_name(f"{path.name}.test.next")
            write_secret_file(staged, token + "\n")
            cli.audit.append_sync(
                admin_event(
                    CHANGE_ADMIN_TOKEN,
                    path.name,
                    "cli",
                    Outcome.ALLOWED,
                    {"rotation": rotation_id(token)},
                )
            )
            await server._refresh_admin_token_and_audit()
            os.replace(staged, path)
        await server._refresh_admin_token_and_audit()
        assert server.admin_token_hash == hash_token(token)
    finally:
        await server.aclose()
        cli.close()
    store = SqliteStore(settings.db_path)
    try:
        bodies = [orjson.loads(e.body) for e in store.read_audit(0, 1000)]
    finally:
        store.close()
    changes = [b for b in bodies if b["verb"] == CHANGE_ADMIN_TOKEN]
    assert [(c["transport"], "rotation" in c) for c in changes] == [("cli", True), ("cli", True)]


@pytest.mark.parametrize("name", ["data", "state/mcp0"])
def test_a_plugin_directory_that_holds_the_data_dir_is_not_installed(
    tmp_path: Path, name: str
) -> None:
    # (cd myplugin && mcp0 plugin install . --data-dir ./data) copied the admin token, the
    # signing key and the audit log into the plugin's code, readable to its workers (found
    # by review)
    source = tmp_path / "myplugin"
    shutil.copytree(NOTES_DIR, source, ignore=shutil.ignore_patterns("__pycache__"))
    runtime = Runtime(load_settings(None, {"data_dir": source / name}, environ={}))
    try:
        with pytest.raises(ManifestError, match="holds the server's data dir"):
            runtime.install_plugin(source)
        assert runtime.store.get_plugin("notes") is None
    finally:
        runtime.close()


def test_a_hidden_data_dir_inside_the_plugin_directory_is_left_out_of_its_copy(
    tmp_path: Path,
) -> None:
    source = tmp_path / "myplugin"
    shutil.copytree(NOTES_DIR, source, ignore=shutil.ignore_patterns("__pycache__"))
    runtime = Runtime(load_settings(None, {"data_dir": source / ".mcp0"}, environ={}))
    try:
        runtime.install_plugin(source)
        record = runtime.store.get_plugin("notes")
        assert record is not None
        copy = runtime.plugins.copy_path(record)
        assert not (copy / ".mcp0").exists()
        assert not list(copy.rglob("admin.token"))
    finally:
        runtime.close()


@pytest.mark.anyio
@pytest.mark.slow
async def test_an_admin_token_change_the_log_could_not_record_is_recorded_later(
    tmp_path: Path,
) -> None:
    # Taken up, then its record failed (a full disk): no later poll saw a change, so it was
    # never recorded (found by review). It is tried again at each poll until it is.
    def changes(runtime: Runtime) -> list[dict[str, Any]]:
        bodies = [orjson.loads(e.body) for e in runtime.store.read_audit(0, 100_000)]
        return [b for b in bodies if b["verb"] == CHANGE_ADMIN_TOKEN and "at_start" not in b]

    async with started(tmp_path / "data") as runtime:
        runtime.settings.admin_token_path.write_text("mcp0_written-by-hand\n")
        writer = sqlite3.connect(runtime.settings.db_path, isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")  # past the store's busy timeout
            with pytest.raises(StorageError):
                await runtime._refresh_admin_token_and_audit()
        finally:
            writer.close()
        assert runtime.admin_token_hash == hash_token("mcp0_written-by-hand")  # in force
        assert changes(runtime) == []
        await runtime._refresh_admin_token_and_audit()  # the next poll: nothing changed since
        [recorded] = changes(runtime)
        assert recorded["outcome"] == "allowed"
        await runtime._refresh_admin_token_and_audit()
        assert len(changes(runtime)) == 1  # once


@pytest.mark.anyio
async def test_a_token_a_command_rotated_in_and_that_was_changed_back_is_recorded_again(
    tmp_path: Path,
) -> None:
    # `mcp0 admin rotate-token` recorded a token the server never saw (the old file was put
    # back before it looked): the log's last word named a token not in force, while the
    # server took requests with the old one (found by review)
    settings = load_settings(None, {"data_dir": tmp_path / "data", "examples": False}, environ={})
    server = Runtime(settings)  # (not started: its watcher's steps are taken here)
    try:
        server.record_what_governs()
        old = settings.admin_token_path.read_text()
        command = Runtime(settings)
        rotate_admin_token(settings.admin_token_path, command.audit, command.store)
        command.close()
        settings.admin_token_path.write_text(old)
        await server._refresh_admin_token_and_audit()
        await server._refresh_admin_token_and_audit()  # (nothing new the second time)
        bodies = [orjson.loads(e.body) for e in server.store.read_audit(0, 1000)]
        recorded = server.store.recorded(ADMIN_TOKEN_RECORDED)
    finally:
        await server.aclose()
    changes = [b for b in bodies if b["verb"] == CHANGE_ADMIN_TOKEN]
    assert [(b["transport"], "rotation" in b, b.get("restated")) for b in changes] == [
        ("files", False, None),  # (at start)
        ("cli", True, None),
        ("files", False, True),
    ]
    assert server.admin_token_hash == hash_token(old.strip())
    assert recorded == recorded_token_digest(old.strip())


@pytest.mark.anyio
async def test_a_plugin_removed_and_installed_again_by_a_command_is_not_taken_for_the_old_one(
    tmp_path: Path,
) -> None:
    # An agent's principal, kept for up to 2 s, still listed a plugin a command had removed
    # (detaching it): for that long the agent could call the plugin installed under its name,
    # attached to no one (found by review)
    settings = load_settings(None, {"data_dir": tmp_path / "data", "examples": False}, environ={})
    server = Runtime(settings)  # (not started: its watcher's steps are taken here)
    try:
        server.install_plugin(NOTES_DIR)
        token = (await server.agents.spawn("ada", ["notes"], via="cli")).token
        await server.plugins.refresh(only=())
        assert server.agents.authenticate(token).plugins == {"notes"}  # (and kept)
        command = Runtime(settings)
        command.remove_plugin("notes")
        command.install_plugin(NOTES_DIR, adopt_data=True)
        command.close()
        assert await server.plugins.refresh(only=())
        assert server.agents.authenticate(token).plugins == frozenset()
    finally:
        await server.aclose()


@pytest.mark.anyio
async def test_a_server_s_start_records_the_audit_events_an_earlier_run_lost(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    async with started(data):
        pass
    note = data / "audit-lost.json"  # (as a run whose store filled up left it)
    note.write_bytes(b'{"failed_events": 3, "failure": "the database is full"}')
    async with started(data) as runtime:
        bodies = [orjson.loads(e.body) for e in runtime.store.read_audit(0, 100_000)]
        [said] = [b for b in bodies if b["verb"] == "resume_audit_log"]
        assert (said["failed_before_restart"], said["failure"]) == (3, "the database is full")
        assert not note.exists()
