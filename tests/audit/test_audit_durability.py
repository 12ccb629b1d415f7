"""Every acknowledged audit entry survives SIGKILL of the appending process."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

from mcp_zero.audit import verify_store
from mcp_zero.storage import SqliteStore

TARGET = Path(__file__).with_name("audit_kill_target.py")


def _read_acks(proc: subprocess.Popen[bytes], want: int, deadline: float) -> bytes:
    """Read the child's stdout until ``want`` lines arrived or ``deadline`` passed."""
    assert proc.stdout is not None
    data = b""
    newline = b"\n"
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while data.count(newline) < want:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"only {data.count(newline)} acks before the deadline"
            if sel.select(timeout=remaining):
                chunk = os.read(proc.stdout.fileno(), 65536)
                assert chunk, f"appender exited early: rc={proc.wait(timeout=5)}"
                data += chunk
    return data


def test_acknowledged_entries_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    proc = subprocess.Popen(
        [sys.executable, str(TARGET), str(path), "48"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        data = _read_acks(proc, want=600, deadline=time.monotonic() + 60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.stdout is not None
    assert proc.stderr is not None
    data += proc.stdout.read()  # acks already in the pipe when the child died
    stderr = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, stderr.decode()

    # A torn last line (killed mid-write) is not an acknowledgement.
    acked = [int(line) for line in data.split(b"\n")[:-1]]
    assert len(acked) >= 600
    assert len(set(acked)) == len(acked)

    with SqliteStore(path) as store:
        report = verify_store(store)
        stored = {e.seq for e in store.read_audit(limit=1_000_000)}
    assert stored == set(range(1, report.head_seq + 1))
    assert set(acked) <= stored
    assert max(acked) <= report.head_seq
