"""docs/operations.md's shell commands, run as they are written: a backup of a data dir a
runtime has open, its restore, and the audit log verified with standard tools."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

from mcp_zero.audit import verify_store
from mcp_zero.config import load_settings
from mcp_zero.runtime import Runtime

OPERATIONS = Path(__file__).parents[1] / "docs" / "operations.md"
NOTES_DIR = Path(__file__).parents[1] / "src" / "mcp_zero" / "examples" / "plugins" / "notes"


def shell(commands: str, **variables: Path) -> subprocess.CompletedProcess[str]:
    """``commands`` run by bash, with ``mcp0`` on the PATH and ``variables`` set."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(
        ["bash", "-c", commands],
        env={"PATH": path, **{name: str(value) for name, value in variables.items()}},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_documented_backup_restore_and_verification_run_as_written(tmp_path: Path) -> None:
    # The procedure was not written down, and the hash format only in a docstring (found
    # by review): the doc's own commands, on a live data dir, give what mcp0 gives
    for tool in ("sqlite3", "basenc", "sha256sum", "tar"):
        assert shutil.which(tool), f"{tool}: docs/operations.md's commands need it"
    backup, restore, verify = re.findall(r"```sh\n(.*?)```", OPERATIONS.read_text(), re.S)
    data, copies, restored = tmp_path / "data", tmp_path / "backup", tmp_path / "restored"
    data.mkdir()  # the operator's, 0755 as many are: a restore must not copy its mode
    data.chmod(0o755)
    runtime = Runtime(load_settings(None, {"data_dir": data}, environ={}))
    try:
        runtime.record_what_governs()  # (as a server starts: two records)
        runtime.install_plugin(NOTES_DIR)
        head = verify_store(runtime.store)
        assert head.count == 3
        assert (data / "mcp0.db-wal").stat().st_size > 0  # live: what it wrote is in its WAL
        # a running server's list of its workers: restored, it could make the next start
        # take a process that has its worker's pid since for a leftover (found by review)
        (data / "workers").mkdir()
        (data / "workers" / "4242-17.json").write_text("{}")
        backed_up = shell(backup, DATA=data, BACKUP=copies)
        live = shell(verify, DB=data / "mcp0.db")
    finally:
        runtime.close()
    verified = f"ok: {head.count} records, head seq {head.head_seq}, hash {head.head_hash}\n"
    assert backed_up.returncode == 0, backed_up.stderr
    assert (live.returncode, live.stdout) == (0, verified), live.stderr
    done = shell(restore, BACKUP=copies, RESTORED=restored)
    assert (done.returncode, done.stdout) == (0, verified), done.stderr  # mcp0 audit verify's
    assert "open to others" not in done.stderr  # (the umask of the backup)
    assert stat.S_IMODE(restored.stat().st_mode) == 0o700
    assert not (restored / "workers").exists()
    for secret in ("mcp0.db", "admin.token", "keys/signing.key"):
        assert stat.S_IMODE((restored / secret).stat().st_mode) == 0o600, secret
    assert sorted(p.name for p in (restored / "plugins" / "notes").iterdir()) == sorted(
        p.name for p in (data / "plugins" / "notes").iterdir()
    )
    db = restored / "mcp0.db"
    assert shell(verify, DB=db).stdout == verified
    with contextlib.closing(sqlite3.connect(db)) as raw, raw:
        raw.execute("DROP TRIGGER audit_no_update")
        body, right = raw.execute("SELECT body, hash FROM audit WHERE seq = 2").fetchone()
        raw.execute("UPDATE audit SET body = CAST('{}' AS BLOB) WHERE seq = 2")
    broken = shell(verify, DB=db)
    assert (broken.returncode, broken.stdout) == (2, "seq 2: hash does not match\n")
    # A hash padded with spaces, or cut by a NUL, read as the hash itself: the recipe said
    # ok where mcp0 audit verify did not (found by review)
    for forged in ("' ' || hash", "hash || ' '", "hash || char(0) || 'junk'", "upper(hash)"):
        with contextlib.closing(sqlite3.connect(db)) as raw, raw:
            raw.execute("UPDATE audit SET body = ?, hash = ? WHERE seq = 2", (body, right))
            raw.execute(f"UPDATE audit SET hash = {forged} WHERE seq = 3")
        broken = shell(verify, DB=db)
        expected = (2, "seq 3: a hash is not 64 lowercase hex digits\n")
        assert (broken.returncode, broken.stdout) == expected, forged
    # sqlite3's failure went to stderr, and the loop said ok of the rows read before it: a
    # database corrupt at record N verified as "ok: N - 1 records", a mistyped path as "ok:
    # 0 records", both exiting 0 (found by a bug hunt)
    damaged = tmp_path / "damaged.db"
    shutil.copy(copies / "mcp0.db", damaged)
    with contextlib.closing(sqlite3.connect(damaged)) as raw:
        (root,) = raw.execute("SELECT rootpage FROM sqlite_master WHERE name = 'audit'").fetchone()
        (page_size,) = raw.execute("PRAGMA page_size").fetchone()
    assert shell(verify, DB=damaged).stdout == verified
    with damaged.open("r+b") as file:
        file.seek((root - 1) * page_size)
        file.write(b"\xff" * page_size)
    scratch = tmp_path / "scratch"  # (where the rows are read to first)
    scratch.mkdir()
    for unreadable in (damaged, tmp_path / "mistyped.db"):
        failed = shell(verify, DB=unreadable, TMPDIR=scratch)
        assert (failed.returncode, failed.stdout) == (1, f"cannot read {unreadable}\n")
        assert failed.stderr.startswith("Error: "), failed.stderr  # (sqlite3's: why)
        assert list(scratch.iterdir()) == []
    assert not (tmp_path / "mistyped.db").exists()
