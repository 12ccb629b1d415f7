"""A real full disk for a test: a small tmpfs mounted in a mount namespace of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def on_a_full_disk(disk: Path, script: str, *args: str, timeout: float = 120) -> str:
    """Run Python ``script`` with ``disk`` (a directory, made here) as its first argument and
    ``args`` after it, with a 1 MiB tmpfs mounted on ``disk`` in a mount namespace of its own,
    and return what it printed. Root and util-linux's unshare are needed, as on every machine
    CI runs on: the test fails, not skips, without."""
    unshare = shutil.which("unshare")
    assert unshare is not None, "this test needs unshare(1) (util-linux)"
    assert os.geteuid() == 0, "this test needs root, to mount a tmpfs in a mount namespace"
    disk.mkdir()
    done = subprocess.run(
        [
            unshare,
            "--mount",
            "sh",
            "-c",
            'mount -t tmpfs -o size=1m tmpfs "$1" || exit 77; disk=$1 python=$2 script=$3;'
            ' shift 3; exec "$python" -c "$script" "$disk" "$@"',
            "sh",
            str(disk),
            sys.executable,
            script,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode != 77, f"cannot mount a tmpfs here: {done.stderr.strip()}"
    assert done.returncode == 0, done.stderr
    return done.stdout
